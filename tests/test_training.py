"""`vlm-fusion train`: each family through each stage on LLaVA-format data, the label masks against LLaVA's rules,
TRL's conversational format, LoRA / QLoRA, resuming, and every kind of bad input in one line."""

import json
import math
import os
import re
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from vlm_fusion.tools.tiny import TINY_QFORMER, write_training_parts
from vlm_fusion.training import TrainOptions, train
from vlm_fusion.training.models import load_generation_model

BRIDGES = {
    "llava": {"projector_type": "mlp2x_gelu"},
    "blip2": {**TINY_QFORMER, "qformer_dropout": 0.0},
    "flamingo": {"num_latents": 4, "perceiver_depth": 1, "perceiver_heads": 2, "perceiver_head_dim": 16,
                 "cross_attention_heads": 2, "cross_attention_head_dim": 16},
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_training_parts(tmp_path_factory.mktemp("parts"))


def options(parts, out, family="llava", stage="align", data="captions.json", **kwargs):
    defaults = dict(data=str(parts / data), image_folder=str(parts / "images"), output_dir=str(out), stage=stage,
                    family=family, vision_tower=str(parts / "vision"), language_model=str(parts / "lm"),
                    bridge=BRIDGES[family], batch_size=4, max_steps=8, logging_steps=1, save_steps=100,
                    bridge_lr=1e-2, lm_lr=1e-3)
    return TrainOptions(**{**defaults, **kwargs})


# ---- comparing runs whose float32 arithmetic differs only in the order of its sums (conftest.FLOAT32_REORDER) --


def adam_step_bound(step: int, betas=(0.9, 0.999)) -> float:
    """The most one Adam step moves a weight, in units of the learning rate: |m_hat / sqrt(v_hat)| at step `step`
    (Cauchy-Schwarz on m's and v's sums over the gradients so far; about 1 for the first steps)."""
    b1, b2 = betas
    return (1 - b1) / (1 - b1 ** step) * math.sqrt((1 - b2 ** step) / (1 - b2)) \
        * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(step)))


def adam_drift_bound(lr: float, steps: int) -> float:
    """How far apart AdamW can take one weight in two runs whose gradients differ only by rounding. Adam divides each
    gradient by its own size, so a weight whose gradient is within rounding of 0 can step +lr in one run and -lr in
    the other, whatever the gradient's scale: up to 2 x lr x the step bound per step (weight decay only shrinks the
    gap). Such weights are the ones the loss does not depend on, so the losses still agree to float32. The betas are
    the Trainer's, which the recipe keeps."""
    return 2 * lr * sum(adam_step_bound(t) for t in range(1, steps + 1))


# Patches the trainer of the process it runs in: after the first step's backward (before clipping and the optimizer
# step), the process of rank 0 saves the gradient every process then holds, the engine's reduction over the global
# batch, whole (FSDP2 shards it; accelerate runs DeepSpeed's backward and step in one call), in float64.
FIRST_GRADIENT = textwrap.dedent("""
    import os
    import torch
    from vlm_fusion.training import trainer as _trainer

    def record_first_gradient(path):
        rank = int(os.environ.get("RANK", "0"))

        def save(named):
            grads = {}
            for name, parameter in named:
                if not parameter.requires_grad:
                    continue
                if hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping"):
                    from deepspeed.utils import safe_get_full_grad
                    grad = safe_get_full_grad(parameter)
                else:
                    grad = parameter.grad
                if grad is not None:
                    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                    grads[name.removeprefix("module.")] = grad.detach().double().cpu()
            if rank == 0 and not os.path.exists(path):
                torch.save(grads, path)

        step = _trainer.FusionTrainer.training_step
        def training_step(self, *args, **kwargs):
            loss = step(self, *args, **kwargs)
            if self.state.global_step == 0 and not self.is_deepspeed_enabled:
                save(self.model.named_parameters())
            return loss
        _trainer.FusionTrainer.training_step = training_step

        from accelerate.utils import deepspeed as _deepspeed
        backward = _deepspeed.DeepSpeedEngineWrapper.backward
        def deepspeed_backward(self, loss, sync_gradients=True, **kwargs):
            if getattr(self, "_recorded", False):
                return backward(self, loss, sync_gradients=sync_gradients, **kwargs)
            self._recorded = True
            self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
            self.engine.backward(loss, **kwargs)
            save(self.engine.module.named_parameters())
            if sync_gradients:
                self.engine.step()
        _deepspeed.DeepSpeedEngineWrapper.backward = deepspeed_backward
""")


def gradient_gap(grads: dict, reference: dict) -> float:
    """The largest difference between two gradients as a fraction of the largest gradient entry of the model. Rounding
    an entry's sums moves it by eps times the magnitudes summed into it, the gradients flowing through the network,
    not by eps times the entry: a key's bias (softmax ignores it: its exact gradient is 0) or a bias under a norm
    (terms that cancel) holds only such noise, and differs between two runs by 100% of itself."""
    assert grads.keys() == reference.keys() and grads, (sorted(grads)[:3], sorted(reference)[:3])
    scale = max(g.abs().max().item() for g in reference.values())
    return max((grads[k] - reference[k]).abs().max().item() for k in reference) / scale


def losses(out) -> list[float]:
    history = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# ---- the label masks: LLaVA's preprocess_plain and preprocess_v1, written here from its rules ----------------------
def llava_plain_labels(tokenizer, ids, image_token_id, image_tokens):
    """preprocess_plain: `<image>` + caption + sep, tokenized with BOS; the first len(tokenize("<image>")) tokens (BOS and
    the image) masked — with the image expanded to its placeholders, those are masked too."""
    masked = len(tokenizer("<image>").input_ids) - 1 + image_tokens  # BOS (if any) + the placeholders
    return [-100] * masked + ids[masked:]


def llava_v1_labels(tokenizer, text, ids, eos, assistant="ASSISTANT:"):
    """preprocess_v1: split the conversation into rounds at the end-of-turn token (sep2), each round at "ASSISTANT:";
    mask BOS and each round's instruction (up to and including the role), keep its answer and the sep2."""
    labels, position = list(ids), 0
    bos = 1 if ids and ids[0] == tokenizer.bos_token_id and not text.startswith(tokenizer.bos_token) else 0
    labels[:bos], position = [-100] * bos, bos
    count = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    for round_text in text.split(eos)[:-1]:
        instruction, answer = round_text.split(assistant)
        instruction_len = count(instruction + assistant)
        labels[position : position + instruction_len] = [-100] * instruction_len
        position += instruction_len + count(answer) + 1  # the answer and its sep2
    labels[position:] = [-100] * (len(labels) - position)  # what follows the last sep2
    return labels


@pytest.mark.parametrize("family", list(BRIDGES))
def test_label_masks_follow_llavas_plain_and_v1_rules(parts, family, tmp_path):
    from vlm_fusion.training import data
    from vlm_fusion.training.encoding import encode

    torch.manual_seed(0)
    model, processor = load_generation_model(options(parts, tmp_path, family))
    image_id, per_image = processor.image_token_id, model.config.num_image_tokens()
    for sample in data.load(str(parts / "captions.json"), str(parts / "images"))[0][:2]:
        plain = encode(processor, sample, [(32, 32)], "plain", getattr(processor, "end_of_chunk_token", None) or "\n")
        assert plain.labels == llava_plain_labels(processor.tokenizer, plain.input_ids, image_id, per_image)
        assert plain.labels.count(-100) < len(plain.labels)
    eos = getattr(processor, "end_of_chunk_token", None) or processor.tokenizer.eos_token
    for sample in data.load(str(parts / "conversations.json"), str(parts / "images"))[0]:
        chat = encode(processor, sample, [(32, 32)] * len(sample.images), "chat", "\n")
        unexpanded = [t for i, t in enumerate(chat.input_ids)
                      if t != image_id or chat.input_ids[i - 1] != image_id or per_image == 1]
        reference = llava_v1_labels(processor.tokenizer, chat.text, unexpanded, eos)
        mine = [label for i, label in enumerate(chat.labels)
                if chat.input_ids[i] != image_id or chat.input_ids[i - 1] != image_id or per_image == 1]
        assert mine == reference, sample.id
        answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
        learned = processor.tokenizer.decode([t for t in chat.labels if t != -100])
        assert learned == "".join(f" {a}{eos}" for a in answers)  # the answers and their end-of-turn tokens only


# ---- each family through each stage -----------------------------------------------------------------------------
RUNS = [("llava", "align", {}), ("llava", "instruct", {}), ("blip2", "align", {}), ("blip2", "instruct", {}),
        ("flamingo", "align", {}), ("flamingo", "flamingo", {}), ("llava", "instruct", {"lora": True}),
        ("llava", "instruct", {"qlora": True}), ("flamingo", "flamingo", {"train_output_embeddings": True})]


@pytest.mark.parametrize("family,stage,extra", RUNS, ids=[f"{f}-{s}{'-' + next(iter(e)) if e else ''}"
                                                         for f, s, e in RUNS])
def test_a_stage_lowers_the_loss_and_changes_only_what_it_trains(parts, family, stage, extra, tmp_path):
    from transformers import AutoModelForImageTextToText

    data = "captions.json" if stage == "align" else "conversations.json"
    adapters = extra.get("lora") or extra.get("qlora")
    run = options(parts, tmp_path / "out", family, stage, data, **({"lora_r": 4, "lora_alpha": 8} if adapters else {}),
                  **extra)
    torch.manual_seed(run.seed)  # as the recipe does before it builds the model: the same bridge initialisation
    before = {name: p.detach().clone() for name, p in load_generation_model(run, quantize=False)[0].named_parameters()}
    summary = train(run)
    trend = losses(tmp_path / "out")
    print(f"{family} {stage} {extra or ''}: losses {[round(x, 3) for x in trend]}")
    assert all(math.isfinite(x) for x in trend) and trend[-1] < trend[0]
    after = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    parts_of = after.parameter_parts()
    embeddings = "model.language_model.embed_tokens.weight"
    head = "lm_head.weight"  # untied in the tiny LM: the frozen LM's (flamingo) only with train_output_embeddings
    adapted = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")

    def trains(part, name):
        if part == "language_model":
            if adapters:  # LoRA, merged: the decoder's linear layers only; embeddings, norms and the head stay
                return bool(adapted.fullmatch(name))
            return stage == "instruct" or (stage == "flamingo" and (
                name == embeddings or name == head and extra.get("train_output_embeddings", False)))
        return part == "bridge"

    for part, params in after.parameter_parts().items():
        for name, parameter in params.items():
            assert (not torch.equal(parameter, before[name])) == trains(part, name), (part, name)
    assert summary["samples"] == 16 and summary["final_loss"] == trend[-1]
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"`{stage}`" in card and "16 samples" in card and f"{trend[-1]:.4f}" in card


def test_stage_two_starts_from_stage_ones_output(parts, tmp_path):
    train(options(parts, tmp_path / "align", "llava", "align"))
    summary = train(TrainOptions(data=str(parts / "conversations.json"), image_folder=str(parts / "images"),
                                 output_dir=str(tmp_path / "instruct"), stage="instruct", model=str(tmp_path / "align"),
                                 batch_size=4, max_steps=4, logging_steps=1, lm_lr=1e-3, bridge_lr=1e-3))
    assert summary["trainable_parameters"]["language_model"] > 0 and summary["steps"] == 4
    aligned = load_file(tmp_path / "align" / "model.safetensors")
    tuned = load_file(tmp_path / "instruct" / "model.safetensors")
    assert torch.equal(aligned["model.vision_tower.embeddings.patch_embedding.weight"],
                       tuned["model.vision_tower.embeddings.patch_embedding.weight"])
    assert not torch.equal(aligned["model.multi_modal_projector.linear_1.weight"],
                           tuned["model.multi_modal_projector.linear_1.weight"])


# ---- other data formats -----------------------------------------------------------------------------------------
def as_trl_rows(parts, rows):
    """LLaVA rows in TRL's conversational form: `messages` with text and image parts, and `images`."""
    from PIL import Image

    out = []
    for row in rows:
        messages = []
        for turn in row["conversations"]:
            pieces = turn["value"].split("<image>")
            content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
            for piece in pieces[1:]:
                content += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
            messages.append({"role": {"human": "user", "gpt": "assistant"}[turn["from"]], "content": content})
        images = row.get("image") or []
        images = [images] if isinstance(images, str) else images
        out.append({"id": row["id"], "messages": messages,
                    "images": [Image.open(parts / "images" / name).convert("RGB") for name in images]})
    return out


def test_trl_conversational_datasets_encode_as_the_same_llava_json(parts, tmp_path):
    from datasets import Dataset

    from vlm_fusion.training import data
    from vlm_fusion.training.encoding import encode

    rows = json.loads((parts / "conversations.json").read_text())
    trl = as_trl_rows(parts, rows)
    Dataset.from_list(trl).save_to_disk(str(tmp_path / "disk"))
    Dataset.from_list(trl).to_parquet(str(tmp_path / "data.parquet"))
    names = [[row["image"]] if isinstance(row.get("image"), str) else row.get("image") or [] for row in rows]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({**row, "images": own})  # images as paths, in JSON lines
                                                    for row, own in zip(trl, names)))
    torch.manual_seed(0)
    _, processor = load_generation_model(options(parts, tmp_path / "unused"))

    def encoded(path, folder=None):
        samples = data.load(path, folder)[0]
        return [encode(processor, s, [data.image_size(i, s.id) for i in s.images], "chat", "\n") for s in samples]

    reference = encoded(str(parts / "conversations.json"), str(parts / "images"))
    for path, folder in ((tmp_path / "disk", None), (tmp_path / "data.parquet", None),
                         (tmp_path / "data.jsonl", str(parts / "images"))):
        got = encoded(str(path), folder)
        assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in reference], path
    summary = train(options(parts, tmp_path / "out", "llava", "instruct", data=str(tmp_path / "disk"), max_steps=2,
                            image_folder=None))
    assert summary["data"] == "disk" and summary["samples"] == len(rows)


# ---- bad input: one line each, nothing written ------------------------------------------------------------------
def broken(rows, how):
    rows = json.loads(json.dumps(rows))
    if how == "missing image":
        rows[3]["image"] = "nowhere.png"
    elif how == "two markers, one image":
        rows[1]["conversations"][0]["value"] = "<image> <image>\nwhat is this ?"
    elif how == "empty conversation":
        rows[2]["conversations"] = []
    elif how == "unknown role":
        rows[4]["conversations"][1]["from"] = "bot"
    elif how == "no answer":
        rows[5]["conversations"] = rows[5]["conversations"][:1]
    return rows


BAD = [("missing image", "sample cap3: image file .*nowhere.png is missing"),
       ("two markers, one image", "sample cap1: 2 <image> marker\\(s\\) and 1 image\\(s\\)"),
       ("empty conversation", "sample cap2: empty conversation"),
       ("unknown role", "sample cap4: unknown `from` role 'bot'"),
       ("no answer", "sample cap5: no assistant \\(gpt\\) turn"),
       ("unreadable image", "sample cap0: image file .*0.png is not a readable image"),
       ("too long", "16 of 16 samples are longer than --max-length 8 tokens .*never cut"),
       ("output in use", "--output-dir .* is not empty: pass --resume .* or --overwrite")]


@pytest.mark.parametrize("how,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_nothing_is_written(parts, tmp_path, capsys, how, message):
    import shutil

    from vlm_fusion_cli import main

    images = tmp_path / "images"
    shutil.copytree(parts / "images", images)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(broken(json.loads((parts / "captions.json").read_text()), how)))
    if how == "unreadable image":
        (images / "0.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    if how == "output in use":
        out.mkdir()
        (out / "something").write_text("x")
    argv = ["train", "--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"),
            "--language-model", str(parts / "lm"), "--data", str(data), "--image-folder", str(images),
            "--output-dir", str(out), "--max-steps", "2"] + (["--max-length", "8"] if how == "too long" else [])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]) and err[-1].startswith("vlm-fusion: error: train: "), err[-1]
    assert not any("error" in line.lower() or "Traceback" in line for line in err[:-1])  # one line says it all
    if how not in ("too long",):  # found before any model is loaded
        assert not any("Loading weights" in line for line in err)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["something"]


def test_samples_over_max_length_can_be_skipped_with_a_count(parts, tmp_path):
    rows = json.loads((parts / "captions.json").read_text())
    rows[0]["conversations"][1]["value"] = "a red square " * 40
    (tmp_path / "data.json").write_text(json.dumps(rows))
    summary = train(options(parts, tmp_path / "out", data=str(tmp_path / "data.json"), max_length=64,
                            skip_too_long=True, max_steps=2))
    assert summary["samples"] == 15 and summary["samples_skipped"] == 1
    assert "1 longer than 64 tokens skipped" in (tmp_path / "out" / "README.md").read_text()


COMMAND_PROCESS = """
import sys
from vlm_fusion_cli import main
sys.argv = ["vlm-fusion", "train", *sys.argv[1:]]  # as the console script runs it
code = main()
print("bitsandbytes imported:", sys.modules.get("bitsandbytes") is not None)
sys.exit(code)
"""


def test_a_training_command_that_quantises_nothing_goes_without_bitsandbytes(parts, tmp_path):
    """The `vlm-fusion train` process leaves bitsandbytes out (peft imports it eagerly, and it compiles kernels on
    import) when nothing is quantised, and trains as usual; the decision, from the flags and the parts' configs."""
    import argparse
    import subprocess
    import sys

    from vlm_fusion_cli.train import needs_bitsandbytes

    argv = ["--stage", "align", "--family", "llava", "--vision-tower", str(parts / "vision"), "--language-model",
            str(parts / "lm"), "--data", str(parts / "captions.json"), "--image-folder", str(parts / "images"),
            "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--data-cache", str(tmp_path / "cache")]
    done = subprocess.run([sys.executable, "-c", COMMAND_PROCESS, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bitsandbytes imported: False" in done.stdout and (tmp_path / "out" / "model.safetensors").is_file()

    def needs(**kwargs):
        return needs_bitsandbytes(argparse.Namespace(**{**dict(qlora=False, model=None, language_model=str(
            parts / "lm"), vision_tower=str(parts / "vision")), **kwargs}))

    assert not needs() and needs(qlora=True) and needs(language_model="org/some-llm")  # a Hub id: not known
    quantised = tmp_path / "lm-4bit"
    quantised.mkdir()
    (quantised / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    assert needs(language_model=str(quantised))


# ---- killed mid-run, then --resume ------------------------------------------------------------------------------
KILLED_RUN = """
import os, signal, sys
from transformers import TrainerCallback
from vlm_fusion.training import trainer
from vlm_fusion_cli import main

how, at = sys.argv[1], int(sys.argv[2])

class Kill(TrainerCallback):  # the signal arrives while training runs, as a scheduler's or `kill`'s would
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == at:
            os.kill(os.getpid(), getattr(signal, how))

original = trainer.FusionTrainer.__init__
def with_kill(self, *args, callbacks=(), **kwargs):
    original(self, *args, callbacks=[*callbacks, Kill()], **kwargs)
trainer.FusionTrainer.__init__ = with_kill
sys.exit(main(["train", *sys.argv[3:]]))
"""


@pytest.mark.parametrize("how,at,checkpoint", [("SIGTERM", 3, 4), ("SIGKILL", 5, 3)])
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(parts, tmp_path, how, at, checkpoint):
    import subprocess
    import sys

    def argv(out):
        return ["--stage", "instruct", "--family", "blip2", "--vision-tower", str(parts / "vision"),
                "--language-model", str(parts / "lm"), "--data", str(parts / "conversations.json"),
                "--image-folder", str(parts / "images"), "--output-dir", str(out), "--batch-size", "4",
                "--max-steps", "8", "--save-steps", "3", "--logging-steps", "1", "--bridge-lr", "1e-3",
                "--bridge", "num_query_tokens=4", "--bridge", "qformer_hidden_size=64",
                "--bridge", "qformer_num_hidden_layers=1", "--bridge", "qformer_num_attention_heads=4",
                "--bridge", "qformer_intermediate_size=128"]  # the Q-Former's dropout stays on: RNG state resumes too

    from vlm_fusion_cli import main

    assert main(["train", *argv(tmp_path / "whole")]) == 0
    # the killed run computes on as many threads as this process (bit-identical weights need the same reductions)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, how, str(at), *argv(tmp_path / "run")],
                            capture_output=True, text=True, timeout=600, env=env)
    if how == "SIGTERM":  # stopped after the step under way (the next), with a checkpoint, and said so
        assert killed.returncode == 143, killed.stderr[-2000:]
        assert "stopped by SIGTERM after step 4" in killed.stderr and "--resume" in killed.stderr
    else:
        assert killed.returncode == -9
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [f"checkpoint-{checkpoint}"]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert main(["train", *argv(tmp_path / "run"), "--resume"]) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == list(range(1, 9))  # the step counter went on from the checkpoint
    whole = json.loads((tmp_path / "whole" / "checkpoint-8" / "trainer_state.json").read_text())
    rates = lambda s: [e["learning_rate"] for e in s["log_history"] if "loss" in e]  # noqa: E731
    assert rates(state) == rates(whole)  # and so did the schedule
    resumed, reference = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
