"""`vlm-fusion explain`: where the model looked, per answer token (PNGs and a page)."""

from .common import MODEL_HELP, fail, positive_int
from .generate import build_prompt, load_for_generation, open_image


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--image", required=True, action="append", help="an image; repeat for several, in prompt order")
    p.add_argument("--prompt", required=True, help="the question; it is put in the model's chat template")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as it is, no chat template (one <image> per image; default: before the text)")
    p.add_argument("--out", required=True, help="directory for token_NNN.png, answer.png and explain.html")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)


def run(args) -> int:
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
    prompt = build_prompt(processor, args.prompt, args.raw, images=len(images))
    try:
        result = explain(model, processor, images, prompt, max_new_tokens=args.max_new_tokens, progress=tqdm)
    except ExplainError as error:
        return fail(f"explain: {error}")
    written = write(result, args.out, progress=tqdm)
    answer = processor.decode(result.token_ids, skip_special_tokens=True).strip()
    print(f"vlm-fusion explain: {len(result.tokens)} answer tokens {answer!r}; "
          f"{len(written['tokens'])} pictures, {written['grid']} and {written['page']}")
    return 0
