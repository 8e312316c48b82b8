"""`vlm-fusion train` in two processes on the CPU (gloo), through accelerate's own launcher with the shipped configs:
DDP, FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 against one process with the same global batch."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import FLOAT32_REORDER, random_image, slow_except
from test_training import FIRST_GRADIENT, adam_drift_bound, gradient_gap
from vlm_fusion.tools.tiny import write_training_clips, write_training_parts

# DDP in the default run; FSDP2 there too through the Q-Former's two-process test and the README's LoRA command
# (tests/test_readme.py); the other engines are the heavier variants (DeepSpeed compiles its CPU op for ~3 minutes on a
# fresh machine), run by `.ci/run` with `-m slow`.
ENGINES = slow_except("ddp", ["ddp", "fsdp2", "zero2", "zero3"])
STEPS, BRIDGE_LR, LM_LR = 6, 1e-2, 1e-3

# Runs in every process: the recipe as `vlm-fusion train` runs it, recording whether each step's batch on this rank
# held an image, the first step's gradient (test_training.FIRST_GRADIENT), and the in-memory model's logits on a fixed
# input just before the model is saved.
INSTRUMENTED = FIRST_GRADIENT + textwrap.dedent("""
    import json, os, sys
    import torch
    from vlm_fusion.training import runner, trainer
    from vlm_fusion_cli import main

    record, probe = sys.argv[1], sys.argv[2]
    record_first_gradient(record + ".gradient.pt")
    rank = int(os.environ.get("RANK", "0"))
    step = trainer.FusionTrainer.training_step
    def training_step(self, model, inputs, *args, **kwargs):
        with open(f"{record}.{rank}", "a") as f:
            f.write(json.dumps("pixel_values" in inputs) + "\\n")
        return step(self, model, inputs, *args, **kwargs)
    trainer.FusionTrainer.training_step = training_step

    save = runner.save
    def save_after_probe(trainer_, run, summary):
        model = run.model
        inputs = torch.load(probe, weights_only=False)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        model.train(was_training)
        if rank == 0:
            torch.save(logits, probe + ".logits")
        return save(trainer_, run, summary)
    runner.save = save_after_probe
    sys.exit(main(["train", *sys.argv[3:]]))
""")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_clips(write_training_parts(tmp_path_factory.mktemp("parts")))


@pytest.fixture(scope="module")
def probe(parts, tmp_path_factory):
    """A fixed input for the logits check, from the processor of the model the runs compose."""
    from vlm_fusion.training import TrainOptions
    from vlm_fusion.training.models import load_generation_model

    _, processor = load_generation_model(TrainOptions(data="", output_dir="", family="flamingo", vision_tower=str(parts / "vision"),
                                           language_model=str(parts / "lm"), bridge=FLAMINGO))
    inputs = processor(images=[random_image(0, (32, 32))], text=["USER: <image>\nwhat colour is it ?\nASSISTANT:"],
                       return_tensors="pt")
    path = tmp_path_factory.mktemp("probe") / "inputs.pt"
    torch.save(dict(inputs), path)
    return path


FLAMINGO = {"num_latents": 4, "perceiver_depth": 1, "perceiver_heads": 2, "perceiver_head_dim": 16,
            "cross_attention_heads": 2, "cross_attention_head_dim": 16}


def run(parts, probe, out, engine=None, data="conversations.json", extra=()):
    """Flamingo-style (gated blocks inside the LM's layers, text-only samples in the data) through the instruct
    stage: 6 steps of a global batch of 2 — one sample per process in two processes."""
    argv = ["--stage", "instruct", "--family", "flamingo", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", str(parts / data), *extra,
            "--image-folder", str(parts / "images"), "--output-dir", str(out), "--max-steps", str(STEPS),
            "--logging-steps", "1", "--bridge-lr", str(BRIDGE_LR), "--lm-lr", str(LM_LR),
            *[item for key, value in FLAMINGO.items() for item in ("--bridge", f"{key}={value}")]]
    record = out.parent / f"{out.name}.batches"
    script = [os.path.join(out.parent, "instrumented.py"), str(record), str(probe)]
    with open(script[0], "w") as f:
        f.write(INSTRUMENTED)
    if engine is None:
        command = [sys.executable, *script, *argv, "--batch-size", "2"]
    else:
        import vlm_fusion.training

        config = os.path.join(os.path.dirname(vlm_fusion.training.__file__), "accelerate", f"{engine}.yaml")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                   *script, *argv, "--batch-size", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                               "VLM_FUSION_DATA_CACHE": str(out.parent / "data-cache")})  # a cache of this run's own
    assert done.returncode == 0, done.stderr[-4000:]
    # one process ran the data pass; the other waited for it and read its cache
    assert done.stderr.count("data cache: built") == 1, done.stderr[-4000:]
    assert done.stderr.count("data cache: reused") == (1 if engine else 0), done.stderr[-4000:]
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    batches = [[json.loads(line) for line in open(f"{record}.{rank}")] for rank in range(2 if engine else 1)]
    return (losses, load_file(out / "model.safetensors"), batches, torch.load(str(probe) + ".logits"),
            torch.load(f"{record}.gradient.pt"))


@pytest.fixture(scope="module")
def one_process(parts, probe, tmp_path_factory):
    return run(parts, probe, tmp_path_factory.mktemp("one") / "out")


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_as_one_with_the_same_global_batch(parts, probe, one_process, engine, tmp_path):
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    assert_trained_as_one(run(parts, probe, tmp_path / "out", engine), one_process, engine, probe, tmp_path / "out")


@pytest.mark.slow  # the blank-clip path it needs runs in the default suite (test_training_video)
def test_two_processes_train_as_one_on_clips_beside_images(parts, probe, tmp_path):
    """The same on LLaVA-Video-style clips mixed with images and text (tools.tiny.write_training_clips): a step where
    one process holds a clip and the other none runs the video path in both (`blank_video_tokens`)."""
    video = dict(data="mixed.json", extra=["--num-frames", "4"])
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run(parts, probe, tmp_path / "one" / "out", **video)  # each run its own data cache
    two = tmp_path / "two" / "out"
    assert_trained_as_one(run(parts, probe, two, "ddp", **video), one, "ddp", probe, two)


def assert_trained_as_one(result, reference, engine, probe, out):
    from transformers import AutoModelForImageTextToText

    losses, weights, batches, logits, grads = result
    reference_losses, reference_weights, _, _, reference_grads = reference
    # what the claim is about: the first step's gradient is the global batch's, to float32's summation order (the
    # bounds and their reasons: test_training.FLOAT32_REORDER, gradient_gap, adam_drift_bound)
    grad_gap = gradient_gap(grads, reference_grads)
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses))
    weight_gap = max((weights[k] - reference_weights[k]).abs().max().item() for k in reference_weights)
    print(f"{engine}: 2 processes vs 1, first gradient {grad_gap:.2e} of its scale, losses {loss_gap:.2e} of theirs, "
          f"max |dweight| {weight_gap:.2e} (bound {adam_drift_bound(BRIDGE_LR, STEPS):.1e})")
    assert grad_gap <= FLOAT32_REORDER
    assert len(losses) == len(reference_losses) == STEPS and loss_gap <= FLOAT32_REORDER
    assert weights.keys() == reference_weights.keys() and weight_gap <= adam_drift_bound(BRIDGE_LR, STEPS)
    # a step where one process had only text and the other an image completed (the blank-image path ran)
    assert any(a != b for a, b in zip(*batches)), batches
    # what was saved (gathered from the shards) is the model that trained: it reloads with the same logits, to the
    # summation order of this process's kernels against the training processes' (one thread each)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        again = reloaded(**torch.load(probe, weights_only=False)).logits
    assert (again - logits).abs().max() <= FLOAT32_REORDER * logits.abs().max()


@pytest.mark.slow  # the README's LoRA command itself runs in the default suite (tests/test_readme.py), quiet there too
def test_the_readme_lora_run_in_two_fsdp2_processes_is_quiet_and_its_bridge_gradient_is_one_processs(parts, tmp_path):
    """The README's LoRA command (llava, instruct, --lora, fsdp2, 2 processes): no FSDP2 warning about the projector's
    output (a view, which an in-place op would cut from FSDP2's backward hook) and no deprecation notice, and the
    projector's first gradient is one process's with the global batch. (The adapters' own gradients are not compared:
    LoRA's dropout draws other masks in two processes; lora_B starts at 0, so the bridge's first gradient does not
    pass through them.)"""
    import vlm_fusion.training

    script = tmp_path / "lora.py"
    script.write_text(FIRST_GRADIENT + "import sys\nfrom vlm_fusion_cli import main\n"
                      "record_first_gradient(sys.argv[1])\nsys.exit(main(['train', *sys.argv[2:]]))\n")
    config = os.path.join(os.path.dirname(vlm_fusion.training.__file__), "accelerate", "fsdp2.yaml")
    argv = ["--stage", "instruct", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", str(parts / "conversations.json"),
            "--image-folder", str(parts / "images"), "--lora", "--lora-r", "8", "--lora-alpha", "16",
            "--max-steps", "1", "--data-cache", str(tmp_path / "data-cache")]
    grads, stderr = {}, {}
    for name, launch, batch in [("one", [], "4"), ("fsdp2", ["-m", "accelerate.commands.launch", "--config_file",
                                                              config, "--num_processes", "2"], "2")]:
        done = subprocess.run([sys.executable, *launch, str(script), str(tmp_path / f"{name}.pt"), *argv,
                               "--output-dir", str(tmp_path / name), "--batch-size", batch],
                              capture_output=True, text=True, timeout=900,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-4000:]
        grads[name], stderr[name] = torch.load(tmp_path / f"{name}.pt"), done.stderr
    assert "view tensor" not in stderr["fsdp2"] and "deprecated" not in stderr["fsdp2"], stderr["fsdp2"][-4000:]
    bridge = [k for k in grads["one"] if "multi_modal_projector" in k]
    assert len(bridge) == 4 and grads["fsdp2"].keys() == grads["one"].keys()
    assert gradient_gap({k: grads["fsdp2"][k] for k in bridge}, {k: grads["one"][k] for k in bridge}) <= FLOAT32_REORDER
