"""Training throughput: `vlm-fusion train` against TRL's SFTTrainer on the same model, data and global batch.

    python benchmarks/train.py                      # default size (CLIP-B/16-sized tower + 12-layer 1024-wide LM)
    python benchmarks/train.py --size tiny --steps 2 --samples 8   # the smoke run the test suite does

One row per stage — align (bridge only), instruct (bridge + LM) on the LLaVA-style family, and the Flamingo stage
(resampler + gated blocks + input embeddings) on the Flamingo-style family. A `qformer` row measures BLIP-2's stage 1
(ITC + ITM + ITG, the tower frozen, no LM) against LAVIS 1.0.2's own `Blip2Qformer` (its files, from its PyPI wheel,
imported with stand-ins for what they import: `tests/lavis_reference.py`) on the same tower, sizes (BLIP-2's Q-Former:
12 layers, 768 wide, 32 queries) and batch: forward, backward and an AdamW step, timed after a warm-up step. Both trainers start from the same
parts (random weights: speed does not depend on them), freeze the same parts, see the same conversations in the
same chat layout (TRL has no plain layout, so the align row uses the chat layout too) and the same batch and number
of steps; each runs in its own process. Reported: samples/s and tokens/s of the training loop (Trainer's own
`train_runtime`, tokens = non-padding input tokens, images' placeholders included), the wall time including data
preparation (our pre-pass; TRL's dataset preparation), and peak resident memory; ratios ours / TRL (above 1 is
faster, below 1 is less memory).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import measure  # noqa: E402
import setups  # noqa: E402

STAGES = {  # row -> (family, stage)
    "align": ("llava", "align"),
    "instruct": ("llava", "instruct"),
    "flamingo": ("flamingo", "flamingo"),
    "qformer": ("blip2", "qformer"),
}
QFORMER_VOCAB, QFORMER_TEXT = 30523, 32  # bert-base-uncased + [DEC]; LAVIS's max_txt_len


def write_parts(root, size, samples: int):
    """The tower and LM of `size` (random weights) with an image processor and a byte-level BPE tokenizer, and
    `samples` two-turn LLaVA-format conversations about solid-colour images."""
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    from vlm_fusion.tools.tiny import tiny_bpe_tokenizer

    torch.manual_seed(0)
    vision = setups.vision_config(size)
    CLIPVisionModel(AutoConfig.for_model(**vision)).save_pretrained(os.path.join(root, "vision"))
    setups.image_processor(size["image_size"]).save_pretrained(os.path.join(root, "vision"))
    tokenizer = tiny_bpe_tokenizer()
    lm_config = {**size["lm"], "vocab_size": max(size["lm"]["vocab_size"], len(tokenizer))}
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm_config))
    lm.save_pretrained(os.path.join(root, "lm"))
    tokenizer.save_pretrained(os.path.join(root, "lm"))
    os.makedirs(os.path.join(root, "images"))
    colours = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}
    rows = []
    for i in range(samples):
        name = list(colours)[i % 4]
        Image.new("RGB", (size["image_size"],) * 2, colours[name]).save(os.path.join(root, "images", f"{i}.png"))
        rows.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the image ?"},
            {"from": "gpt", "value": f"the image is {name} , a solid {name} square"},
            {"from": "human", "value": "is it a circle ?"}, {"from": "gpt", "value": "no , it is a square"}]})
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(rows, f)


def bridge_options(family, size) -> dict:
    if family == "llava":
        return {"projector_type": "mlp2x_gelu"}
    f = size["flamingo"]
    return dict(num_latents=f["latents"], perceiver_depth=f["depth"], perceiver_heads=f["heads"],
                perceiver_head_dim=f["head_dim"], cross_attention_heads=f["heads"], cross_attention_head_dim=f["head_dim"],
                cross_attention_every_n_layers=f["every_n"])


def options(root, out, family, stage, args):
    from vlm_fusion.training import TrainOptions

    return TrainOptions(data=os.path.join(root, "data.json"), image_folder=os.path.join(root, "images"),
                        output_dir=out, stage=stage, layout="chat", family=family,
                        vision_tower=os.path.join(root, "vision"), language_model=os.path.join(root, "lm"),
                        bridge=bridge_options(family, setups.SIZES[args.size]), batch_size=args.batch_size,
                        max_steps=args.steps, logging_steps=args.steps, save_steps=10**9, warmup=0.0)


def run_ours(root, out, family, stage, args) -> dict:
    import time

    from vlm_fusion.training import train

    start = time.perf_counter()
    summary = train(options(root, out, family, stage, args))
    wall = time.perf_counter() - start
    state = json.load(open(os.path.join(out, f"checkpoint-{args.steps}", "trainer_state.json")))
    metrics = next(e for e in reversed(state["log_history"]) if "train_runtime" in e)
    return dict(runtime=metrics["train_runtime"], tokens=metrics["num_input_tokens_seen"], wall=wall,
                samples=summary["steps"] * args.batch_size)


def run_trl(root, out, family, stage, args) -> dict:
    """TRL's SFTTrainer on the same model (composed and frozen by the recipe's own functions) and conversations."""
    import time

    import torch
    from datasets import Dataset
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    from vlm_fusion.training import STAGES, data
    from vlm_fusion.training.models import freeze_for, load_generation_model

    start = time.perf_counter()
    run = options(root, out, family, stage, args)
    torch.manual_seed(run.seed)
    model, processor = load_generation_model(run)
    freeze_for(model, STAGES[stage], run)
    rows = []
    for sample in data.load(run.data, run.image_folder)[0]:
        messages = []
        for message in sample.messages:
            head, *rest = message["content"].split("<image>")
            content = ([{"type": "text", "text": head}] if head else []) + [
                part for text in rest for part in ({"type": "image"}, {"type": "text", "text": text})]
            messages.append({"role": message["role"], "content": content})
        rows.append({"messages": messages, "images": [Image.open(p).convert("RGB") for p in sample.images]})
    config = SFTConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                       learning_rate=STAGES[stage].bridge_lr, lr_scheduler_type="cosine", logging_steps=args.steps,
                       save_strategy="no", report_to=[], max_length=None, bf16=False, seed=run.seed,
                       include_num_input_tokens_seen="non_padding", dataloader_pin_memory=False,
                       use_cpu=not torch.cuda.is_available())
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=processor)
    output = trainer.train()
    wall = time.perf_counter() - start
    return dict(runtime=output.metrics["train_runtime"], tokens=trainer.state.num_input_tokens_seen, wall=wall,
                samples=args.steps * args.batch_size)


def qformer_batch(size, batch: int):
    """The same random images and captions for both Q-Formers: ids drawn past BERT's special tokens, `[CLS]` first."""
    import torch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size["image_size"], size["image_size"], generator=generator)
    ids = torch.randint(1000, QFORMER_VOCAB - 1, (batch, QFORMER_TEXT), generator=generator)
    ids[:, 0] = 101  # [CLS]
    return pixels, ids, torch.ones_like(ids)


def qformer_steps(step, args) -> dict:
    """`step()` once to warm up, then `args.steps` times, timed."""
    import time

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    runtime = time.perf_counter() - start
    return dict(runtime=runtime, wall=runtime, tokens=args.steps * args.batch_size * QFORMER_TEXT,
                samples=args.steps * args.batch_size)


def run_ours_qformer(root, out, args) -> dict:
    import torch

    from vlm_fusion import FusionBlip2ForImageTextRetrieval, FusionBlip2QFormerConfig
    from vlm_fusion.vision import load_vision_tower

    size = setups.SIZES[args.size]
    q = size["qformer"]
    torch.manual_seed(0)
    config = FusionBlip2QFormerConfig(
        vision_config=load_vision_tower(os.path.join(root, "vision")).config, num_query_tokens=q["queries"],
        qformer_hidden_size=q["hidden"], qformer_num_hidden_layers=q["layers"], qformer_num_attention_heads=q["heads"],
        qformer_intermediate_size=q["ffn"], qformer_vocab_size=QFORMER_VOCAB, qformer_bos_token_id=QFORMER_VOCAB - 1)
    model = FusionBlip2ForImageTextRetrieval(config, vision_tower=load_vision_tower(os.path.join(root, "vision")))
    model.vision_tower.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixels, ids, mask = qformer_batch(size, args.batch_size)

    def step():
        loss = model(pixel_values=pixels, input_ids=ids, attention_mask=mask, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return qformer_steps(step, args)


def run_lavis_qformer(root, out, args) -> dict:
    """LAVIS's `Blip2Qformer.forward` (stage 1) on the same frozen tower: `visual_encoder` gives the tower's last
    hidden layer, as our model reads it."""
    import pathlib

    import torch
    from transformers import BatchEncoding

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from lavis_reference import build_lavis_qformer

    from vlm_fusion.vision import load_vision_tower

    size = setups.SIZES[args.size]
    q = size["qformer"]
    tower = load_vision_tower(os.path.join(root, "vision")).requires_grad_(False)

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower

        def forward(self, pixels):
            return self.tower(pixels, output_hidden_states=True).hidden_states[-1]

    model = build_lavis_qformer(vision_width=tower.config.hidden_size, hidden_size=q["hidden"], num_layers=q["layers"],
                                num_heads=q["heads"], intermediate_size=q["ffn"], cross_attention_freq=2,
                                num_query_tokens=q["queries"], vocab_size=QFORMER_VOCAB, max_position_embeddings=512,
                                embed_dim=256, max_txt_len=QFORMER_TEXT, bos_token_id=QFORMER_VOCAB - 1, jitter=0)
    model.visual_encoder = Tower()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixels, ids, mask = qformer_batch(size, args.batch_size)
    samples = {"image": pixels, "text_input": BatchEncoding({"input_ids": ids, "attention_mask": mask})}

    def step():
        model(samples).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return qformer_steps(step, args)


def measure_one(which, root, family, stage, args) -> dict:
    """One trainer in a fresh process: its loop's time, tokens and wall time, and the process's peak memory."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import train as bench, measure; "
            "args = bench.parse(json.loads(sys.argv[6])); "
            "run = getattr(bench, 'run_' + sys.argv[2]); "
            "out = run(sys.argv[3], sys.argv[7], args) if sys.argv[5] == 'qformer' else "
            "run(sys.argv[3], sys.argv[7], sys.argv[4], sys.argv[5], args); "
            "out['peak_mb'] = measure.peak_rss_mb(); print(json.dumps(out))")
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), which, root,
                               family, stage, json.dumps(args.argv), os.path.join(out, "run")],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(f"{which} {stage} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["samples_per_s"] = result["samples"] / result["runtime"]
    result["tokens_per_s"] = result["tokens"] / result["runtime"]
    return result


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(setups.SIZES), default="default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2, help="global batch (one process)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    args.argv = list(argv or [])
    return args


def main(argv=None) -> int:
    args = parse(argv if argv is not None else sys.argv[1:])
    size = setups.SIZES[args.size]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        print(f"building the parts ({args.size}) and {args.samples} conversations ...", flush=True)
        write_parts(root, size, args.samples)
        for row in args.stages:
            family, stage = STAGES[row]
            qformer = stage == "qformer"  # BLIP-2's stage 1: against LAVIS, not TRL (which has no such stage)
            ours = measure_one("ours_qformer" if qformer else "ours", root, family, stage, args)
            trl = measure_one("lavis_qformer" if qformer else "trl", root, family, stage, args)
            rows.append(dict(stage=row, family=family, ours=ours, trl=trl, baseline="LAVIS" if qformer else "TRL",
                             samples_ratio=ours["samples_per_s"] / trl["samples_per_s"],
                             tokens_ratio=ours["tokens_per_s"] / trl["tokens_per_s"],
                             memory_ratio=ours["peak_mb"] / trl["peak_mb"]))
            print(f"  {row}: ours {ours['samples_per_s']:.2f} samples/s, {rows[-1]['baseline']} "
                  f"{trl['samples_per_s']:.2f}", flush=True)
    lines = ["| stage | family | baseline | samples/s ours / baseline | x | tokens/s ours / baseline | x | "
             "wall s ours / baseline | peak MB ours / baseline | memory x |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t = r["ours"], r["trl"]
        lines.append(f"| {r['stage']} | {r['family']} | {r['baseline']} | {o['samples_per_s']:.2f} / "
                     f"{t['samples_per_s']:.2f} | "
                     f"{r['samples_ratio']:.2f} | {o['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} | "
                     f"{r['tokens_ratio']:.2f} | {o['wall']:.0f} / {t['wall']:.0f} | {o['peak_mb']:.0f} / "
                     f"{t['peak_mb']:.0f} | {r['memory_ratio']:.2f} |")
    report = (f"# Training: vlm-fusion train vs TRL SFTTrainer; BLIP-2 stage 1 vs LAVIS (size `{args.size}`, global "
              f"batch {args.batch_size}, "
              f"{args.steps} steps, {os.cpu_count()} CPU threads)\n\n" + "\n".join(lines) + "\n")
    measure.write_report(args.out, "training", report, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
