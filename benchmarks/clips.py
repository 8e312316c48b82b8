"""Clips under a token budget, accuracy beside cost: the seeds' trade-off measured on one task.

    python benchmarks/clips.py --frames 8                        # every setup trained and scored at 8 frames
    python benchmarks/clips.py --frames 32 --steps 20 --per-kind 0   # 32 frames: the cost columns only
    python benchmarks/clips.py --setups llava --steps 40         # some setups, a short budget (a quick look)

Each family's video path, and the knob each has, on the same vision tower and LM: the demo's (`vlm_fusion.demo`), whose
clips ask what no single frame shows (which way a shape moves, which appears last, how many times one blinks). Every
setup starts from its family's demo image model, as shipped at commit `IMAGE_MODELS_COMMIT` (before the video stage;
read out of git, or `--image-models DIR`), and runs the demo's video stage (`vlm_fusion.demo.train.train_video`:
`vlm-fusion train --num-frames F` with the setup's video fields; by default the demo's budget, `--steps` 500 of
`--batch-size` 32, clips and image questions mixed, each sample seen twice; the LLaVA-style setups start from the
demo's LM trained on the clips written as text, `--clip-text-steps`, trained once for all of them; `--rows-steps` and
`--words-steps` give the BLIP-2-style setups the route the demo's BLIP-2-style checkpoint takes, off by default;
`--rows-steps` gives the Flamingo-style setups the tower's rows its demo checkpoint learns too).
A 32-frame clip is the 8-frame one recorded 4x slower (`clips.render_clip`), so every row answers the same questions.
`--trained SETUP@FRAMES=DIR` scores a model the same stage trained elsewhere (the demo's checkpoints are its families'
plain video paths at 8 frames; the BLIP-2-style one took the route first and a video stage six times longer, the
Flamingo-style one the tower's rows first and a video stage 24 times longer) and measures only the training speed,
over `--probe-steps`. Then, on the trained model:

* **LM tokens / clip**: the config's `num_video_tokens(F)`; Flamingo-style: the one `<video>` marker (its latents reach
  the LM by cross-attention);
* **prefill (ms)**: one clip and its question, batch 1, median of `--repeats` (the demo models are tiny: this is the
  overhead-dominated end; `benchmarks/run.py --tables video` has the same setups at CLIP-B/16 and a 1024-wide LM);
* **KV (KB)**: the LM's KV cache after that prefill, plus the Flamingo-style model's cached media K/V;
* **train samples/s**: the video stage's (`train_samples_per_second`);
* **accuracy**: greedy exact match on `--per-kind` held-out clips per temporal type (seed 12345); chance is 1/4 for
  the direction and the shape that appears last, 1/3 for the blink count.

Ratios are against the baseline row, `llava, every patch` at 8 frames. Writes `<out>/clips.md` and `clips.json`.
"""

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402

IMAGE_MODELS_COMMIT = "83ea8c7"  # the last commit whose demo checkpoints read images only
BASELINE = ("llava, every patch", 8)
# name -> (family, the video path's fields, frame counts); each family's plain video path at 8 and 32 frames, its knob
SETUPS = {
    "llava, every patch": ("fusion_llava", {}, (8, 32)),
    # the demo tower's 3x3 patch grid: average pooling would leave 1x1 at stride 2 and nothing at 4; OneVision's
    # bilinear resize leaves ceil(3 / stride) a side (2x2, 1x1)
    "llava, pooled 2 (bilinear)": ("fusion_llava", {"video_pooling": "bilinear", "video_pool_stride": 2}, (8,)),
    "llava, pooled 4 (bilinear)": ("fusion_llava", {"video_pooling": "bilinear", "video_pool_stride": 4}, (8,)),
    "blip2, per frame": ("fusion_blip2", {"video_bridge": "per_frame"}, (8, 32)),
    "blip2, video Q-Former": ("fusion_blip2", {"video_bridge": "video_qformer", "num_video_query_tokens": 16,
                                               "max_num_frames": 32}, (8, 32)),
    "flamingo, 16 latents": ("fusion_flamingo", {}, (8, 32)),
    "flamingo, 64 latents": ("fusion_flamingo", {"num_latents": 64}, (8,)),
}


def image_models(args, work) -> str:
    """The demo's image models: `--image-models`, or the package's checkpoints at `IMAGE_MODELS_COMMIT` from git."""
    if args.image_models:
        return args.image_models
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True)
    if root.returncode:
        raise SystemExit(f"benchmarks/clips.py: not in a git checkout; give --image-models DIR (the demo's image "
                         f"models: src/vlm_fusion/demo/checkpoints at commit {IMAGE_MODELS_COMMIT})")
    archive = subprocess.run(["git", "archive", IMAGE_MODELS_COMMIT, "src/vlm_fusion/demo/checkpoints"],
                             cwd=root.stdout.strip(), capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", work], input=archive, check=True)
    return os.path.join(work, "src", "vlm_fusion", "demo", "checkpoints")


def folder_name(text: str) -> str:
    """A setup's folder in --work: "llava, pooled 2 (bilinear), 8" -> "llava_pooled_2_(bilinear)_8"."""
    return text.replace(",", "").replace(" ", "_")


def starting_model(family, video: dict, images: str, work: str, name: str) -> str:
    """The family's image model; with `num_latents` other than its own, the same with a resampler of that many
    latents (the latents start new, every other weight as trained)."""
    import vlm_fusion
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = os.path.join(images, vlm_fusion.FAMILIES[family].name)
    latents = video.get("num_latents")
    if latents is None or latents == AutoConfig.from_pretrained(path).num_latents:
        return path
    out = os.path.join(work, folder_name(name), "image")
    model = AutoModelForImageTextToText.from_pretrained(path, num_latents=latents, ignore_mismatched_sizes=True)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(path).save_pretrained(out)
    return out


@torch.no_grad()
def cost(model, processor, frames: int, repeats: int) -> dict:
    """Prefill latency, KV bytes and LM tokens of one held-out clip and its question."""
    from vlm_fusion.demo import clips

    clip, _, question, _ = clips.examples(4321, 1, num_frames=frames)[0]
    inputs = processor(videos=[clips.as_array(clip)], text=[clips.PROMPT.format(question=question)],
                       return_tensors="pt")
    out = model(**inputs, use_cache=True)
    return dict(tokens_per_clip=model.config.num_video_tokens(frames), prompt_tokens=int(inputs["input_ids"].shape[1]),
                prefill_ms=1000 * measure.median_time(lambda: model(**inputs, use_cache=True), repeats),
                kv_bytes=measure.cache_bytes(out.cache)
                + measure.media_cache_bytes(getattr(out, "media_cache", None)))


@functools.cache
def stage_data(work: str, frames: int, steps: int, batch_size: int, images: bool) -> str:
    """The video stage's data at `frames` frames a clip, written once for every setup that reads them (a probe run
    reads the first steps' worth)."""
    from vlm_fusion.demo import train

    return train.video_data(work, {"video": steps}, num_frames=frames, images=images, batch_size=batch_size)


def run_setup(name, family, video, frames, images, args, work) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_fusion.demo import train

    trained = args.trained.get(f"{name}@{frames}")
    steps = {"video": args.probe_steps if trained else args.steps,  # a probe times the video stage alone
             **{key: 0 if trained else getattr(args, f"{key}_steps") for key in ("clip_text", "rows", "words")}}
    if not train.family_steps(family)["rows"]:  # the rows stage only where the demo's recipe has one
        steps["rows"] = 0
    data = stage_data(work, frames, args.steps, args.batch_size, not args.clips_only)
    start = starting_model(family, video, images, work, name)
    bridge = {k: v for k, v in video.items() if k != "num_latents"}
    slug = folder_name(f"{name}, {frames}")
    shutil.rmtree(os.path.join(work, slug), ignore_errors=True)  # a rerun in the same --work trains anew
    began = time.perf_counter()
    model, processor, summary = train.train_video(family, start, data, steps, work, num_frames=frames, bridge=bridge,
                                                  name=slug, batch_size=args.batch_size)
    trained_s = time.perf_counter() - began
    if trained:  # trained elsewhere by the same stage (the demo's checkpoint): the run above measured its speed
        model = AutoModelForImageTextToText.from_pretrained(trained).eval()
        processor = AutoProcessor.from_pretrained(trained)
        processor.video_processor.num_frames = frames
    accuracy = train.evaluate_clips(model, processor, per_kind=args.per_kind, num_frames=frames) \
        if args.per_kind else None  # --per-kind 0: the cost columns only
    record = dict(setup=name, family=family, frames=frames, **cost(model, processor, frames, args.repeats),
                  train_samples_s=summary["samples_per_second"], train_s=trained_s, final_loss=summary["final_loss"],
                  accuracy=accuracy, trained=trained)
    print(f"  {name}, {frames} frames: {record}", flush=True)
    return record


def report(records, args) -> str:
    from vlm_fusion.demo import clips

    base = next((r for r in records if (r["setup"], r["frames"]) == BASELINE), None)
    kinds = clips.TEMPORAL_TYPES
    data = "clips" if args.clips_only else "samples (clips and image questions, alternating)"
    lines = [f"Commit {measure.commit()}, {measure.load_average()}; {args.steps} steps x {args.batch_size} {data} a "
             f"setup, accuracy on {args.per_kind} held-out clips per type; ratios against `{BASELINE[0]}` at "
             f"{BASELINE[1]} frames.", "",
             "| setup | frames | LM tokens / clip | prefill (ms) | KV (KB) | train samples/s | "
             + " | ".join(kinds) + " | mean | tokens x | prefill x | KV x | samples/s x |",
             "|" + "---|" * (11 + len(kinds))]
    for r in records:
        accuracy = r["accuracy"] or {}
        mean = sum(accuracy.values()) / len(kinds) if accuracy else None

        def ratio(key):
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "—"
        lines.append(f"| {r['setup']} | {r['frames']} | {r['tokens_per_clip']} | {r['prefill_ms']:.1f} | "
                     f"{r['kv_bytes'] / 1024:.0f} | {r['train_samples_s']:.1f} | "
                     + " | ".join(f"{accuracy[k]:.0%}" if accuracy else "—" for k in kinds)
                     + f" | {f'{mean:.0%}' if accuracy else '—'} | {ratio('tokens_per_clip')} | "
                     f"{ratio('prefill_ms')} | {ratio('kv_bytes')} | {ratio('train_samples_s')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="*", default=[], help="run the setups whose name contains one of these")
    parser.add_argument("--frames", default="8,32", help="frame counts, comma-separated (each setup has its own)")
    parser.add_argument("--steps", type=int, default=500, help="video-stage steps a setup (the demo's)")
    parser.add_argument("--batch-size", type=int, default=32, help="the demo's")
    parser.add_argument("--clip-text-steps", type=int, default=None, help="steps of the LLaVA-style LM (and the "
                        "BLIP-2-style one's with --words-steps) on the clips written as text before the video stage "
                        "(the demo's `clip_text_stage`, once for all a family's setups; default: the demo's; 0: none)")
    parser.add_argument("--rows-steps", type=int, default=None, help="the tower's steps on the cells' rows before "
                        "the video stage, for the families whose demo recipe has them: the BLIP-2-style route to time "
                        "(the demo's --query-words) and the Flamingo-style stage (`cell_rows_stage`; default: none, "
                        "the demo's checkpoints took 400)")
    parser.add_argument("--words-steps", type=int, default=None, help="then its queries' on the cells' words "
                        "(`query_words_stage`; default: none, the route is off; the demo's checkpoint took 3000)")
    parser.add_argument("--clips-only", action="store_true", help="train on clips alone (default: clips and the "
                        "image questions mixed, as the demo's video stage)")
    parser.add_argument("--trained", type=lambda text: tuple(text.split("=", 1)), action="append", default=[],
                        metavar="SETUP@FRAMES=DIR", help="a setup already trained by this stage at this budget (the "
                        "demo's checkpoint for its family's plain video path): scored as it is, its training speed "
                        "measured over --probe-steps")
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--include", metavar="JSON", action="append", default=[],
                        help="rows of an earlier run (its clips.json) to report first, e.g. the 8-frame run's")
    parser.add_argument("--per-kind", type=int, default=100, help="held-out clips per temporal question type (0: "
                        "no accuracy, the cost columns only)")
    parser.add_argument("--repeats", type=int, default=5, help="prefill timings (median)")
    parser.add_argument("--image-models", help="the demo's image models (llava/, blip2/, flamingo/); default: the "
                        f"package's at commit {IMAGE_MODELS_COMMIT}, from git")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--work", help="keep the clips and trained models here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    args.trained = dict(args.trained)
    from vlm_fusion.demo import train

    for key in ("clip_text", "rows", "words"):
        if getattr(args, f"{key}_steps") is None:
            setattr(args, f"{key}_steps", train.STEPS[key])
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    frames = {int(f) for f in args.frames.split(",")}
    work = args.work or tempfile.mkdtemp(prefix="vlm-fusion-clips-")
    os.makedirs(work, exist_ok=True)  # a --work folder that does not exist yet
    try:
        images = image_models(args, work)
        records = []
        for path in args.include:
            with open(path) as f:
                records += json.load(f)
        for name, (family, video, counts) in SETUPS.items():
            if args.setups and not any(s in name for s in args.setups):
                continue
            for count in counts:
                if count in frames:
                    records.append(run_setup(name, family, video, count, images, args, work))
        measure.write_report(args.out, "clips", report(records, args), records)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
