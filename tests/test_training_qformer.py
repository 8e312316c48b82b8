"""BLIP-2's stage 1 through `vlm-fusion train --stage qformer`: the Q-Former from BERT, what trains, stage 2 from its
output (weights carried bit for bit), two processes against one (DDP, FSDP2), resume, and bad input in one line."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertForMaskedLM

from conftest import FLOAT32_REORDER, slow_except
from test_training import FIRST_GRADIENT, KILLED_RUN, adam_drift_bound, gradient_gap
from vlm_fusion.tools.tiny import write_training_parts
from vlm_fusion.training import TrainOptions, train
from vlm_fusion_cli import main

BRIDGE = {"num_query_tokens": 4, "embed_dim": 32, "qformer_dropout": 0.0}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_parts(tmp_path_factory.mktemp("parts"))


def stage1(parts, out, **kwargs):
    defaults = dict(data=str(parts / "captions.json"), image_folder=str(parts / "images"), output_dir=str(out),
                    stage="qformer", vision_tower=str(parts / "vision"), qformer_init=str(parts / "bert"),
                    bridge=BRIDGE, batch_size=4, max_steps=8, logging_steps=1, save_steps=100, bridge_lr=1e-3)
    return TrainOptions(**{**defaults, **kwargs})


def logged(out, key="loss") -> list[float]:
    history = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "out"
    return out, train(stage1(parts, out, max_steps=12))


def test_the_q_former_starts_from_bert_as_blip2s_does(parts, tmp_path):
    from vlm_fusion.training.qformer import load_qformer_model

    model, processor = load_qformer_model(stage1(parts, tmp_path))
    bert = BertForMaskedLM.from_pretrained(parts / "bert").state_dict()
    ours = model.state_dict()
    vocab = bert["bert.embeddings.word_embeddings.weight"].shape[0]
    assert len(processor.tokenizer) == vocab + 1 == model.config.qformer_vocab_size  # [DEC] added after BERT's words
    assert torch.equal(ours["qformer.word_embeddings.weight"][:vocab], bert["bert.embeddings.word_embeddings.weight"])
    for layer in range(2):
        theirs = f"bert.encoder.layer.{layer}."
        assert torch.equal(ours[f"qformer.layers.{layer}.self_attn.to_q.weight"],
                           bert[theirs + "attention.self.query.weight"])
        for ff in ("ff", "text_ff"):  # the text FFN is BERT's, the query FFN starts as its copy
            assert torch.equal(ours[f"qformer.layers.{layer}.{ff}.0.weight"], bert[theirs + "intermediate.dense.weight"])
            assert torch.equal(ours[f"qformer.layers.{layer}.{ff}_norm.bias"], bert[theirs + "output.LayerNorm.bias"])
    assert torch.equal(ours["text_head.norm.weight"], bert["cls.predictions.transform.LayerNorm.weight"])
    assert model.config.qformer_hidden_size == 64 and model.config.qformer_max_position_embeddings == 64
    assert model.qformer.query_tokens.std().item() == pytest.approx(0.02, rel=0.3)  # not BERT's zeros: queries differ


def test_stage1_lowers_each_loss_and_trains_only_the_q_former(parts, trained):
    out, summary = trained
    total, itc, itm, itg = (logged(out, key) for key in ("loss", "loss_itc", "loss_itm", "loss_itg"))
    print(f"stage 1: loss {total[0]:.3f} -> {total[-1]:.3f} (itc {itc[0]:.3f} -> {itc[-1]:.3f}, "
          f"itm {itm[0]:.3f} -> {itm[-1]:.3f}, itg {itg[0]:.3f} -> {itg[-1]:.3f})")
    assert len(total) == 12 and total[-1] < total[0] and itg[-1] < itg[0]
    # the parts are logged rounded to 4 decimals: three roundings of at most 5e-5 each
    assert all(abs(t - (c + m + g)) <= 3 * 5e-5 + FLOAT32_REORDER * abs(t) for t, c, m, g in zip(total, itc, itm, itg))
    weights = load_file(out / "model.safetensors")
    tower = load_file(parts / "vision" / "model.safetensors")
    assert all(torch.equal(weights[f"vision_tower.{k.removeprefix('vision_model.')}"], v) for k, v in tower.items()
               if k.startswith("vision_model."))
    assert summary["stage"] == "qformer" and summary["samples"] == 16 and summary["trainable_parameters"]["vision_tower"] == 0
    card = (out / "README.md").read_text()
    assert "`qformer`" in card and "zero-shot-image-classification" in card
    assert type(AutoModel.from_pretrained(out)).__name__ == "FusionBlip2ForImageTextRetrieval"


@pytest.mark.parametrize("instruction_aware", [False, True], ids=["blip2", "instructblip"])
def test_stage2_starts_from_stage1_with_its_weights_bit_for_bit(parts, trained, instruction_aware, tmp_path):
    stage1_out, _ = trained
    bridge = {"qformer_text_input": True} if instruction_aware else {}
    summary = train(TrainOptions(data=str(parts / "captions.json"), image_folder=str(parts / "images"),
                                 output_dir=str(tmp_path / "align"), stage="align", model=str(stage1_out),
                                 language_model=str(parts / "lm"), bridge=bridge, batch_size=4, max_steps=2,
                                 logging_steps=1, bridge_lr=0.0))  # lr 0: what was carried over is what is saved
    assert summary["steps"] == 2
    first, second = load_file(stage1_out / "model.safetensors"), load_file(tmp_path / "align" / "model.safetensors")
    carried = [k for k in first if k.startswith(("vision_tower.", "vision_layernorm.", "qformer."))]
    text_side = [k for k in carried if "word_embeddings" in k or "position_embeddings" in k or ".text_ff" in k]
    kept = [k for k in carried if instruction_aware or k not in text_side]
    assert text_side and all(torch.equal(first[k], second[f"model.{k}"]) for k in kept)
    assert all((f"model.{k}" in second) == instruction_aware for k in text_side)
    assert "model.language_projection.weight" in second
    assert not any(k.startswith(("model.text_head", "model.itm_head", "model.vision_projection")) for k in second)
    lm = load_file(parts / "lm" / "model.safetensors")
    assert torch.equal(second["model.language_model.embed_tokens.weight"], lm["model.embed_tokens.weight"])


def test_stage2_trains_the_q_former_and_projection_with_the_lm_frozen(parts, trained, tmp_path):
    stage1_out, _ = trained
    train(TrainOptions(data=str(parts / "captions.json"), image_folder=str(parts / "images"),
                       output_dir=str(tmp_path / "align"), stage="align", model=str(stage1_out),
                       language_model=str(parts / "lm"), batch_size=4, max_steps=2, logging_steps=1))
    first, second = load_file(stage1_out / "model.safetensors"), load_file(tmp_path / "align" / "model.safetensors")
    assert not torch.equal(first["qformer.query_tokens"], second["model.qformer.query_tokens"])
    lm = load_file(parts / "lm" / "model.safetensors")
    assert all(torch.equal(second[f"model.language_model.{k.removeprefix('model.')}"], v) for k, v in lm.items()
               if k.startswith("model."))


# ---- two processes against one, through accelerate's launcher ---------------------------------------------------
STEPS, LR = 4, 1e-3


def run(parts, out, engine=None):
    """4 steps of a global batch of 4: 4 pairs in one process, or 2 in each of two. Returns the logged losses, the
    saved weights and the first step's gradient (of the global batch, as the engine reduced it)."""
    argv = ["--stage", "qformer", "--vision-tower", str(parts / "vision"), "--qformer-init", str(parts / "bert"),
            "--data", str(parts / "captions.json"), "--image-folder", str(parts / "images"), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--logging-steps", "1", "--bridge-lr", str(LR),
            *[item for key, value in BRIDGE.items() for item in ("--bridge", f"{key}={value}")]]
    script, gradient = out.parent / f"{out.name}.py", out.parent / f"{out.name}.gradient.pt"
    script.write_text(FIRST_GRADIENT + "import sys\nfrom vlm_fusion_cli import main\n"
                      "record_first_gradient(sys.argv[1])\nsys.exit(main(['train', *sys.argv[2:]]))\n")
    if engine is None:
        command = [sys.executable, str(script), str(gradient), *argv, "--batch-size", "4"]
    else:
        import vlm_fusion.training

        config = os.path.join(os.path.dirname(vlm_fusion.training.__file__), "accelerate", f"{engine}.yaml")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                   str(script), str(gradient), *argv, "--batch-size", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return ({key: logged(out, key) for key in ("loss", "loss_itm")}, load_file(out / "model.safetensors"),
            torch.load(gradient))


@pytest.mark.parametrize("engine", slow_except("fsdp2", ["ddp", "fsdp2"]))  # DDP: test_training_distributed
def test_two_processes_give_the_losses_and_weights_of_one_with_the_global_batch(parts, engine, tmp_path):
    (losses, weights, grads), (reference_losses, reference_weights, reference_grads) = \
        run(parts, tmp_path / engine, engine), run(parts, tmp_path / "one")
    # the claim: two processes with 2 pairs each compute the gradient of one with 4 (ITM negatives drawn over the
    # global batch, the features gathered with their gradients), to float32's summation order
    grad_gap = gradient_gap(grads, reference_grads)
    # the losses, to float32's summation order too; loss_itm is logged rounded to 4 decimals, so one rounding step more
    loss_gaps = [abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses["loss"], reference_losses["loss"])]
    itm_ok = all(abs(a - b) <= FLOAT32_REORDER * abs(b) + 1e-4
                 for a, b in zip(losses["loss_itm"], reference_losses["loss_itm"]))
    # the weights, by what AdamW can do with gradients that differ by rounding (see adam_drift_bound); the frozen
    # tower is the same bit for bit
    weight_gap = max((weights[k] - reference_weights[k]).abs().max().item() for k in reference_weights)
    print(f"qformer {engine}: 2 processes x 2 vs 1 x 4, first gradient {grad_gap:.2e} of its scale, losses "
          f"{max(loss_gaps):.2e} of theirs, max |dweight| {weight_gap:.2e} (bound {adam_drift_bound(LR, STEPS):.1e})")
    assert grad_gap <= FLOAT32_REORDER
    assert len(losses["loss"]) == len(reference_losses["loss"]) == STEPS and max(loss_gaps) <= FLOAT32_REORDER
    assert itm_ok, (losses["loss_itm"], reference_losses["loss_itm"])
    assert weights.keys() == reference_weights.keys() and weight_gap <= adam_drift_bound(LR, STEPS)
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights if k.startswith("vision_tower."))


@pytest.mark.slow  # a kill window more: the default run resumes killed runs in test_training and the streaming tests
def test_a_killed_stage1_run_resumes_to_the_weights_of_an_uninterrupted_one(parts, tmp_path):
    def argv(out):
        return ["--stage", "qformer", "--vision-tower", str(parts / "vision"), "--qformer-init", str(parts / "bert"),
                "--data", str(parts / "captions.json"), "--image-folder", str(parts / "images"),
                "--output-dir", str(out), "--batch-size", "4", "--max-steps", "6", "--save-steps", "3",
                "--logging-steps", "1", "--bridge", "num_query_tokens=4", "--bridge", "embed_dim=32"]  # dropout on

    assert main(["train", *argv(tmp_path / "whole")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "SIGKILL", "4", *argv(tmp_path / "run")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    assert main(["train", *argv(tmp_path / "run"), "--resume"]) == 0
    assert logged(tmp_path / "run", "loss_itm") == logged(tmp_path / "whole", "loss_itm")  # the same negatives
    resumed, reference = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)


# ---- bad input: one line each, nothing written -------------------------------------------------------------------
def one_pair(rows):
    return rows[:1]


def no_caption(rows):
    rows[2]["conversations"][1]["value"] = "  <image>  "
    return rows


def two_images(rows):
    rows[1]["image"] = [rows[1]["image"], rows[2]["image"]]
    rows[1]["conversations"][0]["value"] = "<image>\n<image>\nwhat ?"
    return rows


BAD = [
    (one_pair, [], "holds 1 image-caption pair\\(s\\): ITC contrasts each image with the other captions"),
    (no_caption, [], "sample cap2: no caption"),
    (two_images, [], "sample cap1: 2 images; an image-caption pair has one"),
    (None, ["--language-model", "LM"], "--stage qformer loads no language model"),
    (None, ["--drop-init"], "the Q-Former reads captions with a tokenizer of its own"),
]


@pytest.mark.parametrize("edit,extra,message", BAD, ids=["one pair", "no caption", "two images", "with an LM",
                                                         "no tokenizer"])
def test_bad_stage1_input_is_one_line_and_nothing_is_written(parts, tmp_path, capsys, edit, extra, message):
    rows = json.loads((parts / "captions.json").read_text())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(edit(rows) if edit else rows))
    out = tmp_path / "out"
    argv = ["train", "--stage", "qformer", "--vision-tower", str(parts / "vision"), "--data", str(data),
            "--image-folder", str(parts / "images"), "--output-dir", str(out), "--max-steps", "2"]
    argv += [] if "--drop-init" in extra else ["--qformer-init", str(parts / "bert")]
    argv += [str(parts / "lm") if item == "LM" else item for item in extra if item != "--drop-init"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]) and err[-1].startswith("vlm-fusion: error: train: "), err[-1]
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


@pytest.mark.parametrize("model,message", [("stage1", "is a stage-1 Q-Former checkpoint \\(no LM\\): give --language-model"),
                                           ("lm", "is not one")])
def test_stage2_needs_a_stage1_checkpoint_and_an_lm(parts, trained, tmp_path, capsys, model, message):
    stage1_out, _ = trained
    argv = ["train", "--stage", "align", "--data", str(parts / "captions.json"), "--image-folder",
            str(parts / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "2"]
    if model == "stage1":
        argv += ["--model", str(stage1_out)]
    else:  # a generation checkpoint (here the LM's own folder, which is no stage-1 Q-Former) with an LM
        argv += ["--model", str(parts / "lm"), "--language-model", str(parts / "lm")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "out").exists()


def test_captions_longer_than_the_q_former_reads_are_cut_and_counted(parts, tmp_path):
    rows = json.loads((parts / "captions.json").read_text())
    rows[0]["conversations"][1]["value"] = "a red square " * 20
    (tmp_path / "data.json").write_text(json.dumps(rows))
    summary = train(stage1(parts, tmp_path / "out", data=str(tmp_path / "data.json"), max_steps=1))
    assert summary["captions_truncated"] == 1
