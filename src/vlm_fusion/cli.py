"""The `vlm-fusion` command: demo, generate, convert, tokens."""

import argparse
import importlib
import importlib.resources
import os
import sys

DEMO_FAMILIES = ("llava", "blip2", "flamingo")
CONVERTERS = {"llava": "convert_llava", "blip2": "convert_blip2", "openflamingo": "convert_openflamingo"}


def fail(message: str) -> int:
    print(f"vlm-fusion: error: {message}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# ---- demo -------------------------------------------------------------------------------------------------------
def demo_checkpoint(family: str) -> str:
    return str(importlib.resources.files("vlm_fusion.demo") / "checkpoints" / family)


DEMO_PREFIX = "demo:"  # `--model demo:llava` names a demo checkpoint shipped in the package


def resolve_model(name: str) -> str:
    if not name.startswith(DEMO_PREFIX):
        return name
    family = name[len(DEMO_PREFIX):]
    if family not in DEMO_FAMILIES:
        raise ValueError(f"unknown demo model {name!r}; the demo models are "
                         + ", ".join(DEMO_PREFIX + f for f in DEMO_FAMILIES))
    return demo_checkpoint(family)


def load_failure(path: str, error: Exception) -> str:
    """One line for a model that does not load, naming the file at fault where there is one."""
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError) and os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        return f"{os.path.join(path, ', '.join(files))} is not a readable safetensors file ({error})"
    return f"cannot load a model from {path}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"


def demo(args) -> int:
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_fusion  # noqa: F401
    from vlm_fusion.demo import shapes

    quiet()
    rng = np.random.default_rng(args.seed)
    scene = shapes.sample_scene(rng)
    image = shapes.render(scene)
    if args.save_image:
        image.resize((4 * shapes.IMAGE_SIZE,) * 2, 0).save(args.save_image)
    print(f"A fresh synthetic image (seed {args.seed}): {shapes.caption(scene)}"
          + (f" Saved to {args.save_image}." if args.save_image else ""))
    asked = shapes.questions(scene, rng) + [("caption", shapes.CAPTION_QUESTION, shapes.caption(scene))]
    for family in DEMO_FAMILIES if args.family == "all" else (args.family,):
        path = demo_checkpoint(family)
        if not os.path.isdir(path):
            return fail(f"the {family} demo checkpoint is missing from the installed package ({path}).")
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
        print(f"\n{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters):")
        score = 0
        for kind, question, truth in asked:
            inputs = processor(images=[image], text=[shapes.PROMPT.format(question=question)], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=shapes.MAX_ANSWER_TOKENS, do_sample=False)
            answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            right = answer == truth
            score += right
            verdict = "-> right" if right else f'-> WRONG, expected "{truth}"'
            print(f"  Q: {question:<40} A: {chr(34) + answer + chr(34):<54} {verdict}")
        print(f"  {score}/{len(asked)} right")
    return 0


# ---- generate -------------------------------------------------------------------------------------------------
def build_prompt(processor, prompt: str, raw: bool) -> str:
    """The user's question in the model's chat template (one image first), or, with `raw`, the prompt as given."""
    if raw or not getattr(processor, "chat_template", None):
        return prompt if processor.image_token in prompt else f"{processor.image_token}{prompt}"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def generate(args) -> int:
    from PIL import Image, UnidentifiedImageError

    if not args.prompt.strip():
        return fail("--prompt is empty: ask something about the image")
    if not os.path.isfile(args.image):
        return fail(f"no image file at {args.image}")
    try:
        image = Image.open(args.image).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        return fail(f"{args.image} is not a readable image ({error})")
    try:
        path = resolve_model(args.model)
    except ValueError as error:
        return fail(str(error))
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_fusion  # noqa: F401

    quiet()
    try:
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
    except Exception as error:  # any reason a checkpoint does not load is one line here
        return fail(load_failure(path, error))
    prompt = build_prompt(processor, args.prompt, args.raw)
    if prompt.count(processor.image_token) != 1:
        return fail(f"the prompt holds {prompt.count(processor.image_token)} {processor.image_token} markers; "
                    "`generate` takes one image")
    try:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    except ValueError as error:
        return fail(str(error))
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0


# ---- convert ------------------------------------------------------------------------------------------------------
def convert(args, rest) -> int:
    module = importlib.import_module(f"vlm_fusion.conversion.{CONVERTERS[args.source]}")
    return module.main(rest, prog=f"vlm-fusion convert {args.source}")


# ---- tokens --------------------------------------------------------------------------------------------------------
def visual_tokens(image_size: int, patch_size: int, tiles: int = 1, thumbnail: bool = False,
                  num_query_tokens: int = 32, num_latents: int = 64) -> dict:
    """LM positions per image for each family, and what they cost (the seeds' token-budget formulas)."""
    if image_size < patch_size:
        raise ValueError(f"--image-size ({image_size}) is smaller than --patch-size ({patch_size})")
    crops = tiles + (1 if thumbnail else 0)
    per_crop = (image_size // patch_size) ** 2
    return {
        "llava": {"lm_tokens": crops * per_crop, "note": f"{crops} crop(s) x {per_crop} patches"},
        "blip2": {"lm_tokens": crops * num_query_tokens, "note": f"{crops} crop(s) x {num_query_tokens} queries"},
        "flamingo": {"lm_tokens": 1, "note": f"1 <image> token; {crops * num_latents} latents reached by cross-attention"},
    }


def tokens(args) -> int:
    try:
        table = visual_tokens(args.image_size, args.patch_size, args.tiles, args.thumbnail, args.num_query_tokens,
                              args.num_latents)
    except ValueError as error:
        return fail(str(error))
    families = table if args.family == "all" else {args.family: table[args.family]}
    print(f"{args.image_size}px, {args.patch_size}px patches, {args.tiles} tile(s)"
          f"{' + thumbnail' if args.thumbnail else ''}; context window {args.context} tokens")
    for family, row in families.items():
        share = row["lm_tokens"] / args.context
        print(f"  {family:<9} {row['lm_tokens']:>6} LM tokens per image  ({share:.1%} of the context)  {row['note']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-fusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="ask the embedded demo checkpoints about a fresh synthetic image")
    p.add_argument("--family", choices=DEMO_FAMILIES + ("all",), default="all")
    p.add_argument("--seed", type=int, default=None, help="the image's seed (default: a fresh one)")
    p.add_argument("--save-image", metavar="PNG", help="also save the image (upscaled 4x)")
    p = commands.add_parser("generate", help="answer a prompt about an image with any vlm-fusion model")
    p.add_argument("--model", required=True,
                   help="directory, Hub id, or a shipped demo model: " + ", ".join(DEMO_PREFIX + f for f in DEMO_FAMILIES))
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True, help="the question; it is put in the model's chat template")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as it is, no chat template (<image> marks the image; default: before the text)")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)
    p = commands.add_parser("convert", help="convert an upstream checkpoint (the rest goes to the converter)")
    p.add_argument("source", choices=sorted(CONVERTERS))
    p = commands.add_parser("tokens", help="the visual-token budget of each family")
    p.add_argument("--image-size", type=positive_int, default=336)
    p.add_argument("--patch-size", type=positive_int, default=14)
    p.add_argument("--tiles", type=positive_int, default=1)
    p.add_argument("--thumbnail", action="store_true", help="add a downscaled whole-image crop to the tiles")
    p.add_argument("--family", choices=DEMO_FAMILIES + ("all",), default="all")
    p.add_argument("--num-query-tokens", type=positive_int, default=32, help="BLIP-2-style queries per crop")
    p.add_argument("--num-latents", type=positive_int, default=64, help="Flamingo-style latents per crop")
    p.add_argument("--context", type=positive_int, default=4096, help="the LM's context window")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"] and argv[1:2] and argv[1] in CONVERTERS:  # everything after the source is the converter's,
        return convert(argparse.Namespace(source=argv[1]), argv[2:])  # --help included
    args, rest = parser.parse_known_args(argv)
    if args.command != "convert" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo" and args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    return {"demo": demo, "generate": generate, "tokens": tokens}[args.command](args) if args.command != "convert" \
        else convert(args, rest)


if __name__ == "__main__":
    sys.exit(main())
