"""`vlm-fusion explain`'s methods: seconds per answer token at the demo size and the default size, with the
faithfulness figures beside them where there is something to be faithful to.

    python benchmarks/explain.py                      # demo (the shipped checkpoints, 20 shapes questions) + default
    python benchmarks/explain.py --sizes demo --items 200
    python benchmarks/explain.py --sizes tiny --items 2     # the smoke test's

- demo: the three demo checkpoints (96 px scenes, 3 x 3 patches, 4-layer LMs) on colour questions about scenes of two
  or more shapes (`faithfulness.shapes_items`, seed 2026): `faithfulness.evaluate`'s pointing, deletion and insertion
  AUC, and seconds per token (the maps of the whole answer, its generation not counted).
- default: `setups.py`'s default size (a CLIP-B/16-sized tower at 224 px, 14 x 14 patches, and a 12-layer 1024-wide
  LM; random weights) on one random image, the answer fixed at `--tokens` tokens: seconds per token only (random
  weights point at nothing). Occlusion replaces each of the 196 patches: 196 forward passes.

All methods of a family are timed in the same run, one after the other, on the same answer; the last column is each
method's time over occlusion's. The header names the commit and the machine's load at the start and the end.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import commit, load_average  # noqa: E402
from setups import SIZES, family_model  # noqa: E402

from vlm_fusion.explain import METHODS, explain  # noqa: E402
from vlm_fusion.explain.faithfulness import evaluate, shapes_items  # noqa: E402

FAMILIES = ("fusion_llava", "fusion_blip2", "fusion_flamingo")
PROMPTS = {"fusion_llava": "USER: <image>\nwhat is shown in this image ? ASSISTANT:",
           "fusion_blip2": "USER: <image>\nwhat is shown in this image ? ASSISTANT:",
           "fusion_flamingo": "<image>a photo of"}


def demo_rows(items: int, baseline: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_fusion.demo import checkpoint

    questions = shapes_items(2026, items)
    for family in ("llava", "blip2", "flamingo"):
        path = checkpoint(family)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        report = evaluate(model, AutoProcessor.from_pretrained(path), questions, list(METHODS), baseline=baseline)
        slowest = report["occlusion"]["seconds_per_token"]
        for method in METHODS:
            s = report[method]
            yield (f"demo {family}", method, f"{s['seconds_per_token']:.4f}", f"{s['seconds_per_token'] / slowest:.2f}",
                   f"{s['pointing']:.1%}", f"{s['deletion']:.3f}", f"{s['insertion']:.3f}")


def sized_rows(name: str, tokens: int, baseline: str, batch_size: int, grid=None):
    from PIL import Image

    size = SIZES[name]
    torch.manual_seed(0)
    image = Image.fromarray((torch.rand(size["image_size"], size["image_size"], 3) * 255).byte().numpy())
    for family in FAMILIES:
        model, processor = family_model(family, size, size["image_size"])
        answer = list(range(10, 10 + tokens))  # a fixed answer: random weights would stop anywhere
        seconds = {}
        for method in METHODS:
            started = time.perf_counter()
            result = explain(model, processor, [image], PROMPTS[family], method=method, token_ids=answer,
                             baseline=baseline, batch_size=batch_size, grid=grid)
            seconds[method] = (time.perf_counter() - started) / len(result.tokens)
        for method in METHODS:
            yield (f"{name} {family.removeprefix('fusion_')}", method, f"{seconds[method]:.3f}",
                   f"{seconds[method] / seconds['occlusion']:.3f}", "-", "-", "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="demo,default")
    parser.add_argument("--items", type=int, default=20, help="demo: shapes questions")
    parser.add_argument("--tokens", type=int, default=4, help="default: answer tokens explained")
    parser.add_argument("--baseline", default="background")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grid", help="occlusion's cells at setups.py's sizes, ROWSxCOLUMNS (default: the patch grid)")
    args = parser.parse_args(argv)
    print(f"benchmarks/explain.py at {commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{load_average()} at the start")
    print(f"occlusion's grid at setups.py's sizes: {args.grid or 'the patch grid'}")
    print("| size, family | method | s / token | / occlusion | pointing | deletion AUC | insertion AUC |")
    print("|---|---|---:|---:|---:|---:|---:|")
    sizes = args.sizes.split(",")
    rows = []
    if "demo" in sizes:
        rows.append(demo_rows(args.items, args.baseline))
    for name in sizes:
        if name != "demo":  # a size of setups.py: default, large, tiny (the smoke test's)
            grid = tuple(int(v) for v in args.grid.split("x")) if args.grid else None
            rows.append(sized_rows(name, args.tokens, args.baseline, args.batch_size, grid))
    for generator in rows:
        for row in generator:
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"{load_average()} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
