"""Do the demo models' maps point at what was asked? `vlm_fusion.explain`'s faithfulness scores on shapes scenes.

For colour questions ("what colour is the star ?") about scenes with two or more shapes (seed 2026 by default: not
the demo's training or held-out seed), each method maps the answer's first token (the colour word), and
`vlm_fusion.explain.faithfulness.evaluate` scores it: the pointing game (is the map's peak in the asked shape's grid
cell? The demo's tower sees a 96 px scene as 3 x 3 patches of 32 px, which are exactly the scene's grid cells),
deletion and insertion AUC (RISE), and seconds per answer token. Printed per family and method, with the chance
rates on the same scenes: a random cell, a random one of the scene's shapes, and the cells in a random order.

    python examples/explain_shapes.py --items 200 --baseline background --pictures docs/explain

is the same as `vlm-fusion explain --model demo:FAMILY --evaluate shapes --method all --items 200 --baseline
background` for each family, in one table.
"""

import argparse
import os

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import vlm_fusion  # noqa: F401
from vlm_fusion.demo import MODELS, checkpoint
from vlm_fusion.explain import METHODS, explain
from vlm_fusion.explain.faithfulness import evaluate, shapes_items
from vlm_fusion.explain.render import write

SEED = 2026  # as `vlm-fusion explain --evaluate shapes`


def load(family: str):
    path = checkpoint(family)
    return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--families", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--baseline", default="background", help="mean, blur or background (see occlusion)")
    parser.add_argument("--pictures", help="also write each family's pictures and page (every method) for the first "
                                           "question here, and the three side by side (demo_colour_question.png)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    items = shapes_items(args.seed, args.items)
    methods = args.methods.split(",")
    print(f"{len(items)} colour questions on scenes of 2-3 shapes (seed {args.seed}), baseline {args.baseline}\n")
    print("| family | method | pointing | deletion AUC (lower is better) | insertion AUC (higher is better) | "
          "s / token |")
    print("|---|---|---:|---:|---:|---:|")
    chances, grids = [], []
    for family in args.families.split(","):
        model, processor = load(family)
        report = evaluate(model, processor, items, methods, baseline=args.baseline)
        for method in methods:
            s = report[method]
            print(f"| {family} | {method} | {s['pointing']:.1%} | {s['deletion']:.3f} | {s['insertion']:.3f} | "
                  f"{s['seconds_per_token']:.3g} |", flush=True)
        c = report["chance"]
        chances.append(f"{family}: deletion {c['deletion']:.3f}, insertion {c['insertion']:.3f}, answers right "
                       f"{report['answers_right']:.1%}")
        if args.pictures:
            item = items[0]
            results = []
            for method in methods:
                results.append(explain(model, processor, [item.image], item.prompt, method=method,
                                       baseline=args.baseline, question=item.question,
                                       token_ids=results[0].token_ids if results else None))
            grids.append((family, write(results, os.path.join(args.pictures, family))["grid"]))
    c = report["chance"]
    print(f"\nChance on the same scenes: pointing at a random cell {c['random_cell']:.1%}, at a random one of the "
          f"scene's shapes {c['random_object']:.1%}; cells removed in a random order: " + "; ".join(chances))
    if grids:
        side_by_side(grids, items[0].question, os.path.join(args.pictures, "demo_colour_question.png"))
    return 0


def side_by_side(answers, question: str, path: str) -> None:
    from PIL import Image, ImageDraw

    pictures = [(family, Image.open(grid)) for family, grid in answers]
    width = sum(p.width for _, p in pictures) + 12 * (len(pictures) - 1)
    figure = Image.new("RGB", (width, max(p.height for _, p in pictures) + 40), "white")
    draw, x = ImageDraw.Draw(figure), 0
    draw.text((4, 2), f"Q: {question}", fill="black")
    for family, picture in pictures:
        draw.text((x + 4, 22), f"{family}-style", fill="black")
        figure.paste(picture, (x, 40))
        x += picture.width + 12
    figure.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
