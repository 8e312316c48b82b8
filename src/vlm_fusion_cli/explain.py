"""`vlm-fusion explain`: which parts of the image each answer token depends on (PNGs and a page), by relevance,
occlusion or raw attention; `--evaluate` scores the methods' faithfulness (pointing game, deletion / insertion AUC)."""

import json
import os

from .common import MODEL_HELP, fail, positive_int
from .generate import build_prompt, load_for_generation, open_image

METHODS = ("relevance", "occlusion", "attention")  # as `vlm_fusion.explain.METHODS`
DEFAULT_SEED = 2026  # the demo's scenes for --evaluate shapes: not the demo's training or held-out seeds


def methods(text: str) -> list[str]:
    """argparse type: a comma-separated list of methods, or `all`."""
    import argparse

    chosen = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown method {', '.join(unknown) or text!r}: choose from "
                                         f"{', '.join(METHODS)} (comma-separated) or all")
    return list(dict.fromkeys(chosen))


def grid(text: str) -> tuple[int, int]:
    import argparse

    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
        assert rows > 0 and cols > 0
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLUMNS such as 8x8, got {text!r}")
    return rows, cols


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--image", action="append", help="an image; repeat for several, in prompt order")
    p.add_argument("--prompt", help="the question; it is put in the model's chat template")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as it is, no chat template (one <image> per image; default: before the text)")
    p.add_argument("--out", help="directory for token_NNN.png, answer.png and explain.html")
    p.add_argument("--method", type=methods, default=["relevance"],
                   help="relevance (default: gradient-weighted attention through LM, bridge and tower), occlusion "
                        "(the fall in the token's log-odds when a cell is replaced; slow, causal), attention "
                        "(the raw view); several comma-separated, or all, to see them side by side")
    p.add_argument("--baseline", choices=("mean", "blur", "background"), default="mean",
                   help="what a removed cell shows (occlusion, deletion/insertion): the image's mean colour, a blur, or "
                        "its most frequent colour (for objects on a plain background, as the demo's scenes)")
    p.add_argument("--grid", type=grid, help="occlusion's cells, ROWSxCOLUMNS (default: the tower's patch grid)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="masked images per forward pass")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)
    p.add_argument("--evaluate", metavar="DATA",
                   help="score each --method instead: 'shapes' (the demo's scenes with two or more shapes, the asked "
                        "shape's cell as target) or a JSONL file of {\"image\", \"question\", \"target\": [left, top, "
                        "right, bottom], optional \"objects\": [[...], ...], \"answer\"}; prints a table")
    p.add_argument("--items", type=positive_int, default=100, help="--evaluate shapes: how many questions")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="--evaluate shapes: the scenes' seed")


def run(args) -> int:
    if args.evaluate:
        return run_evaluate(args)
    missing = [flag for flag, value in (("--image", args.image), ("--prompt", args.prompt), ("--out", args.out))
               if not value]
    if missing:
        return fail(f"explain: {', '.join(missing)} required (or --evaluate DATA to score the methods)")
    if not args.prompt.strip():
        return fail("--prompt is empty: ask something about the image")
    images = [open_image(path) for path in args.image]
    for image in images:
        if isinstance(image, str):
            return fail(f"explain: {image}")
    loaded = load_for_generation(args.model)
    if isinstance(loaded, str):
        return fail(loaded)
    from tqdm.auto import tqdm  # lazy: import time

    from vlm_fusion.explain import ExplainError, explain
    from vlm_fusion.explain.render import write

    model, processor = loaded
    problem = template_markers(processor, args.prompt, args.raw, len(images))
    if problem:
        return fail(f"explain: {problem}")
    prompt = build_prompt(processor, args.prompt, args.raw, images=len(images))
    results = []
    try:
        for method in args.method:
            results.append(explain(model, processor, images, prompt, method=method, max_new_tokens=args.max_new_tokens,
                                   token_ids=results[0].token_ids if results else None, baseline=args.baseline,
                                   grid=args.grid, batch_size=args.batch_size, question=args.prompt, progress=tqdm))
    except ExplainError as error:
        return fail(f"explain: {error}")
    written = write(results, args.out, progress=tqdm)
    answer = processor.decode(results[0].token_ids, skip_special_tokens=True).strip()
    timing = ", ".join(f"{r.method} {r.seconds / len(r.tokens):.3g} s/token" for r in results)
    print(f"vlm-fusion explain: {len(results[0].tokens)} answer tokens {answer!r} ({timing}); "
          f"{len(written['tokens'])} pictures, {written['grid']} and {written['page']}")
    return 0


def template_markers(processor, prompt: str, raw: bool, images: int) -> str | None:
    """A prompt that holds `<image>` markers while the chat template adds its own: say how many of each."""
    marker = processor.image_token
    if raw or not getattr(processor, "chat_template", None) or marker not in prompt:
        return None
    return (f"--prompt holds {prompt.count(marker)} {marker} marker(s) and the chat template adds {images} (one per "
            f"--image), {prompt.count(marker) + images} in all for {images} image(s): leave {marker} out of --prompt, "
            f"or pass --raw to place the markers yourself")


def read_items(data: str, processor, raw: bool, count: int, seed: int):
    """The items of `--evaluate DATA`, or a one-line reason they cannot be read (as `str`)."""
    from vlm_fusion.explain.faithfulness import Item, shapes_items

    if data == "shapes":
        items = shapes_items(seed, count)
        for item in items:  # the model's own chat template around the question
            item.prompt = build_prompt(processor, item.question, raw, images=1)
        return items
    if not os.path.isfile(data):
        return f"--evaluate {data}: neither 'shapes' nor a JSONL file"
    items = []
    with open(data, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                return f"{data} line {number} is not JSON ({error.msg})"
            target = record.get("target")
            if not (isinstance(target, list) and len(target) == 4):
                return (f"{data} line {number} has no \"target\": [left, top, right, bottom] (the region the answer "
                        "is about, in the image's pixels): the pointing game needs it")
            if "image" not in record or "question" not in record:
                return f"{data} line {number} needs \"image\" and \"question\""
            image = open_image(os.path.join(os.path.dirname(data), record["image"]))
            if isinstance(image, str):
                return f"{data} line {number}: {image}"
            items.append(Item(image=image, prompt=build_prompt(processor, record["question"], raw, images=1),
                              target=tuple(target), objects=record.get("objects", []), answer=record.get("answer"),
                              question=record["question"]))
    return items or f"{data} holds no items"


def run_evaluate(args) -> int:
    loaded = load_for_generation(args.model)
    if isinstance(loaded, str):
        return fail(loaded)
    from tqdm.auto import tqdm  # lazy: import time

    from vlm_fusion.explain import ExplainError
    from vlm_fusion.explain.faithfulness import evaluate

    model, processor = loaded
    items = read_items(args.evaluate, processor, args.raw, args.items, args.seed)
    if isinstance(items, str):
        return fail(f"explain --evaluate: {items}")
    try:
        report = evaluate(model, processor, items, args.method, baseline=args.baseline, batch_size=args.batch_size,
                          progress=tqdm)
    except ExplainError as error:
        return fail(f"explain --evaluate: {error}")
    print(table(args.model, report))
    return 0


def table(name: str, report: dict) -> str:
    """The report as a Markdown table: a row per method, then the chance rates."""
    chance = report["chance"]
    lines = ["| model | method | pointing | deletion AUC (lower is better) | insertion AUC (higher is better) | "
             "s / token |", "|---|---|---:|---:|---:|---:|"]
    for method, scores in report.items():
        if isinstance(scores, dict) and "pointing" in scores:
            lines.append(f"| {name} | {method} | {scores['pointing']:.1%} | {scores['deletion']:.3f} | "
                         f"{scores['insertion']:.3f} | {scores['seconds_per_token']:.3g} |")
    objects = "" if chance["random_object"] != chance["random_object"] else \
        f", a random one of the scene's objects {chance['random_object']:.1%}"
    right = "" if report["answers_right"] is None else f"; answers right {report['answers_right']:.1%}"
    lines.append(f"\n{report['items']} items{right}. Chance: pointing at a random cell {chance['random_cell']:.1%}"
                 f"{objects}; cells in a random order: deletion AUC {chance['deletion']:.3f}, insertion AUC "
                 f"{chance['insertion']:.3f}")
    return "\n".join(lines)
