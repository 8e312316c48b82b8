"""Watching `vlm-fusion train`: `--report-to tensorboard` writes the losses the Trainer logged (read back with
TensorBoard's own reader, the Q-Former stage's three losses too), a missing integration package is one line, the run
ends with `loss.png` shown in its model card (skipped, not failed, without matplotlib), and a run killed while saving
its model resumes from its last-step checkpoint without training a step more."""

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from test_training import options
from test_training_qformer import stage1
from vlm_fusion.tools.tiny import write_training_parts
from vlm_fusion.training import train
from vlm_fusion.training.watch import loss_curves, loss_figure, plot_losses
from vlm_fusion_cli import main


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_parts(tmp_path_factory.mktemp("parts"))


def argv(parts, out, *extra) -> list[str]:
    return ["train", "--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--bridge", "projector_type=mlp2x_gelu",
            "--data", str(parts / "captions.json"), "--image-folder", str(parts / "images"), "--output-dir", str(out),
            "--batch-size", "4", "--max-steps", "5", "--logging-steps", "1", "--bridge-lr", "1e-2", *extra]


@pytest.fixture(scope="module")
def reported(parts, tmp_path_factory):
    """One run through the CLI, with `--report-to tensorboard`."""
    out = tmp_path_factory.mktemp("reported") / "out"
    assert main(argv(parts, out, "--report-to", "tensorboard")) == 0
    return out


def log_history(out) -> list[dict]:
    return json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())["log_history"]


def tensorboard_scalars(out, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted({path.parent for path in (out / "runs").glob("*/events.out.tfevents.*")})
    assert len(runs) == 1, runs
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def logged(out, key: str) -> list[tuple[int, float]]:
    """`key` at each step of the log history, as TensorBoard stores it (float32)."""
    return [(entry["step"], float(np.float32(entry[key]))) for entry in log_history(out) if key in entry]


# ---- --report-to --------------------------------------------------------------------------------------------------
def test_tensorboard_reads_back_the_losses_the_trainer_logged(reported):
    assert [step for step, _ in logged(reported, "loss")] == [1, 2, 3, 4, 5]
    assert tensorboard_scalars(reported, "train/loss") == logged(reported, "loss")
    assert tensorboard_scalars(reported, "train/learning_rate") == logged(reported, "learning_rate")


def test_the_qformer_stage_sends_itc_itm_and_itg_to_tensorboard(parts, tmp_path):
    out = tmp_path / "out"
    train(stage1(parts, out, max_steps=3, report_to="tensorboard"))
    for key in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        assert len(logged(out, key)) == 3, key
        assert tensorboard_scalars(out, f"train/{key}") == logged(out, key), key


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_report_to_without_its_package_is_one_line(parts, tmp_path, capsys, monkeypatch, name):
    for module in ("tensorboard", "tensorboardX", "wandb"):  # as if not installed: import and find_spec fail
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(argv(parts, out, "--report-to", name)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"vlm-fusion: error: train: --report-to {name} needs the {name} package, which is not "
                       f"installed: pip install {name}")
    assert not any("Loading weights" in line or "Traceback" in line for line in err)  # before anything loads
    assert not out.exists()


# ---- loss.png -----------------------------------------------------------------------------------------------------
def test_the_loss_curve_is_a_png_beside_the_model_and_in_its_card(reported):
    with Image.open(reported / "loss.png") as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
        image.verify()
    assert json.loads((reported / "training_summary.json").read_text())["loss_curve"] == "loss.png"
    card = (reported / "README.md").read_text()
    assert "![training loss](loss.png)" in card.split("## Training")[1]


def test_a_readme_sized_run_draws_a_curve_of_points_not_one(parts, tmp_path):
    """The README's align command (16 pairs, batch 4, 2 epochs: 8 steps) with a held-out loss, --logging-steps not
    given: every step is logged, to the picture and to TensorBoard, and each curve's points are marked."""
    out = tmp_path / "out"
    command = [item for item in argv(parts, out) if item not in ("--max-steps", "5", "--logging-steps", "1")]
    assert main([*command, "--epochs", "2", "--eval-data", str(parts / "captions.json"), "--eval-steps", "2",
                 "--report-to", "tensorboard"]) == 0
    curves = loss_curves(log_history(out))
    assert [step for step, _ in curves["training loss"]] == list(range(1, 9))
    assert [step for step, _ in curves["eval loss"]] == [2, 4, 6, 8]
    assert len(tensorboard_scalars(out, "train/loss")) == 8
    lines = loss_figure(log_history(out)).axes[0].get_lines()
    assert [(line.get_label(), len(line.get_xdata()), line.get_marker()) for line in lines] == \
        [("training loss", 8, "o"), ("eval loss", 4, "o")]


def test_the_logging_interval_scales_with_the_run():
    from types import SimpleNamespace

    from vlm_fusion.training.trainer import logging_interval

    def interval(samples, max_steps=-1, epochs=1.0, batch=4, processes=1, accumulation=1):
        args = SimpleNamespace(max_steps=max_steps, per_device_train_batch_size=batch, world_size=processes,
                               gradient_accumulation_steps=accumulation, num_train_epochs=epochs)
        return logging_interval(args, range(samples))

    assert interval(16, epochs=2) == 1 and interval(80, batch=4) == 1  # up to 20 steps: every step
    assert interval(16, max_steps=100) == 5 and interval(10**6) == 10  # 20 points, at most every 10 steps
    assert interval(1600, processes=2, accumulation=2) == 5  # 100 steps of 4 x 2 processes x 2 accumulated


def test_eval_losses_are_drawn_when_the_run_logged_them(tmp_path):
    history = [{"loss": 3.0 - 0.1 * step, "step": step} for step in range(1, 11)]
    assert plot_losses(history, str(tmp_path / "train.png"))
    assert plot_losses(history + [{"eval_loss": 2.8, "step": 5}, {"eval_loss": 2.5, "step": 10}],
                       str(tmp_path / "both.png"))
    train_only, both = (np.asarray(Image.open(tmp_path / name).convert("RGB")) for name in ("train.png", "both.png"))
    assert train_only.shape == both.shape and (train_only != both).any()
    assert not plot_losses([{"train_runtime": 1.0, "step": 10}], str(tmp_path / "none.png"))  # no loss, no picture
    assert not (tmp_path / "none.png").exists()


def test_without_matplotlib_the_run_ends_without_the_curve(parts, tmp_path, monkeypatch, caplog):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "out"
    summary = train(options(parts, out, max_steps=2))
    assert summary["steps"] == 2 and summary["loss_curve"] is None
    assert (out / "model.safetensors").exists() and not (out / "loss.png").exists()
    assert "loss.png" not in (out / "README.md").read_text()
    assert any(re.search(r"matplotlib is not installed: no loss\.png", r.getMessage()) for r in caplog.records)


# ---- killed while saving the model, then --resume --------------------------------------------------------------
class KilledWhileSaving(Exception):
    pass


@pytest.mark.parametrize("max_steps", [6, 8], ids=["last step inside an epoch", "last step ends an epoch"])
def test_a_run_killed_after_its_last_checkpoint_resumes_without_another_step(parts, tmp_path, monkeypatch, max_steps):
    from vlm_fusion.training import runner

    out = tmp_path / "out"
    run = dict(max_steps=max_steps, save_steps=max_steps)  # 16 samples, 4 a batch: 4 steps an epoch

    def killed(*args, **kwargs):  # the last checkpoint is written; the process dies before the model is
        raise KilledWhileSaving

    with monkeypatch.context() as patch:
        patch.setattr(runner, "save", killed)
        with pytest.raises(KilledWhileSaving):
            train(options(parts, out, **run))
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{max_steps}"]
    checkpoint = out / f"checkpoint-{max_steps}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    summary = train(options(parts, out, resume=True, **run))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{max_steps}"]  # no step more
    saved, at_checkpoint = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert saved.keys() == at_checkpoint.keys()
    assert all(torch.equal(saved[k], at_checkpoint[k]) for k in at_checkpoint)
    assert summary["steps"] == state["global_step"] == max_steps
    assert summary["final_loss"] == [e["loss"] for e in state["log_history"] if "loss" in e][-1]
    assert f"| final loss | {summary['final_loss']:.4f} |" in (out / "README.md").read_text()
