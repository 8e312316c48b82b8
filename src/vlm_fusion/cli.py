"""The commands of `vlm-fusion` (demo, generate, explain, serve, train, evaluate, convert, tokens); the arguments are parsed in
`vlm_fusion_cli`."""

import importlib
import os
import sys

from vlm_fusion.demo import FAMILIES as DEMO_FAMILIES
from vlm_fusion.demo import checkpoint as demo_checkpoint
from vlm_fusion_cli import CONVERTERS, DEMO_PREFIX, main  # noqa: F401  (`main`: `vlm_fusion.cli.main` as before)


def fail(message: str) -> int:
    print(f"vlm-fusion: error: {message}", file=sys.stderr)
    return 2


def quiet():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# ---- demo -------------------------------------------------------------------------------------------------------
def resolve_model(name: str) -> str:
    """A directory or Hub id as given; `demo:<family>` -> the shipped demo checkpoint."""
    return demo_checkpoint(name[len(DEMO_PREFIX):]) if name.startswith(DEMO_PREFIX) else name


def load_failure(path: str, error: Exception) -> str:
    """One line for a model that does not load, naming the file at fault where there is one."""
    from safetensors import SafetensorError

    if isinstance(error, SafetensorError) and os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        return f"{os.path.join(path, ', '.join(files))} is not a readable safetensors file ({error})"
    return f"cannot load a model from {path}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"


def demo(args) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return ask_the_demo_models(args)
    finally:  # a caller's process (the tests) keeps its own
        torch.set_num_threads(threads)


def ask_the_demo_models(args) -> int:
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_fusion  # noqa: F401
    from vlm_fusion.demo import shapes

    quiet()
    # The demo models are a few MB: on them torch's intra-op threads cost more than they give (answers 1.7 s against
    # 21 s with 2 threads, 2 busy cores), so one thread; `generate` and the others keep torch's default for any model
    torch.set_num_threads(1)
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
def build_prompt(processor, prompt: str, raw: bool, images: int = 1, videos: int = 0) -> str:
    """The user's question in the model's chat template (the images, then the clips, first), or, with `raw`, the
    prompt as given (the markers put before it when it holds none)."""
    if raw or not getattr(processor, "chat_template", None):
        markers = ""
        if processor.image_token not in prompt:
            markers += processor.image_token * images
        if videos and processor.video_token not in prompt:
            markers += processor.video_token * videos
        return markers + prompt
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def open_image(path: str):
    """The image at `path` in RGB, or a one-line reason it is not one (as `str`)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        return f"no image file at {path}"
    try:
        return Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        return f"{path} is not a readable image ({error})"


def load_for_generation(name: str):
    """`(model, processor)` of a directory, Hub id or `demo:<family>`, or a one-line reason they do not load."""
    try:
        path = resolve_model(name)
    except ValueError as error:
        return str(error)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_fusion  # noqa: F401

    if os.path.isdir(path):  # a Hub id may still need the network
        quiet()
    try:
        return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    except Exception as error:  # any reason a checkpoint does not load is one line here
        return load_failure(path, error)


def generate(args) -> int:
    if not args.prompt.strip():
        return fail("--prompt is empty: ask something about the image")
    if args.image is None and args.video is None:
        return fail("give --image, --video or both")
    if args.num_frames is not None and args.video is None:
        return fail("--num-frames samples the frames of --video; no --video was given")
    image = open_image(args.image) if args.image is not None else None
    if isinstance(image, str):
        return fail(image)
    if args.video is not None and not os.path.isfile(args.video):
        return fail(f"no video file at {args.video}")
    loaded = load_for_generation(args.model)
    if isinstance(loaded, str):
        return fail(loaded)
    import torch

    model, processor = loaded
    if args.video is not None and getattr(processor, "video_processor", None) is None:
        return fail(f"{args.model} reads no video (its processor has no video processor)")
    images, videos = int(image is not None), int(args.video is not None)
    prompt = build_prompt(processor, args.prompt, args.raw, images=images, videos=videos)
    for token, given, what in ((processor.image_token, images, "image"), (processor.video_token, videos, "video")):
        if token is not None and prompt.count(token) != given:
            return fail(f"the prompt holds {prompt.count(token)} {token} markers for {given} {what}(s): `generate` "
                        "takes at most one image and one video")
    try:
        inputs = processor(images=[image] if images else None, videos=[args.video] if videos else None,
                           text=[prompt], return_tensors="pt",
                           **({"num_frames": args.num_frames} if args.num_frames is not None else {}))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    except ValueError as error:
        return fail(str(error))
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0


# ---- explain ------------------------------------------------------------------------------------------------------
def explain(args) -> int:
    if not args.prompt.strip():
        return fail("--prompt is empty: ask something about the image")
    images = [open_image(path) for path in args.image]
    for image in images:
        if isinstance(image, str):
            return fail(f"explain: {image}")
    loaded = load_for_generation(args.model)
    if isinstance(loaded, str):
        return fail(loaded)
    from tqdm.auto import tqdm

    from vlm_fusion.explain import ExplainError
    from vlm_fusion.explain import explain as run
    from vlm_fusion.explain.render import write

    model, processor = loaded
    prompt = build_prompt(processor, args.prompt, args.raw, images=len(images))
    try:
        result = run(model, processor, images, prompt, max_new_tokens=args.max_new_tokens, progress=tqdm)
    except ExplainError as error:
        return fail(f"explain: {error}")
    written = write(result, args.out, progress=tqdm)
    answer = processor.decode(result.token_ids, skip_special_tokens=True).strip()
    print(f"vlm-fusion explain: {len(result.tokens)} answer tokens {answer!r}; "
          f"{len(written['tokens'])} pictures, {written['grid']} and {written['page']}")
    return 0


# ---- serve --------------------------------------------------------------------------------------------------------
def serve(args) -> int:
    """transformers' OpenAI-compatible server on one model (see `vlm_fusion.integrations.transformers_serve`)."""
    from vlm_fusion.integrations import transformers_serve

    try:
        path = resolve_model(args.model)
    except ValueError as error:
        return fail(str(error))
    return transformers_serve.main(path, args.options)


# ---- train --------------------------------------------------------------------------------------------------------
def train(args) -> int:
    import dataclasses
    import logging

    from vlm_fusion.training import DataError, TrainOptions
    from vlm_fusion.training import train as run

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    options = TrainOptions(**{k: v for k, v in vars(args).items() if k in names and k != "bridge"},
                           bridge=dict(args.bridge))
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernel notice, on every import
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process speaks
    try:
        summary = run(options)
    except DataError as error:
        return fail(f"train: {error}") if main_process else 2
    if not main_process:
        return 143 if "stopped_at" in summary else 0
    if "stopped_at" in summary:
        print(f"vlm-fusion train: stopped by SIGTERM after step {summary['stopped_at']}; its checkpoint is in "
              f"{options.output_dir}: run the same command with --resume to continue", file=sys.stderr)
        return 143
    loss = summary["final_loss"]
    print(f"vlm-fusion train: {summary['stage']} stage done: {summary['steps']} steps on {summary['samples']:,} "
          f"samples, final loss {loss:.4f}; the model is in {options.output_dir}" if loss is not None else
          f"vlm-fusion train: {summary['stage']} stage done; the model is in {options.output_dir}")
    return 0


def needs_bitsandbytes(args) -> bool:
    """Whether a training run quantises: `--qlora`, or a part saved quantised (its config says so); a Hub id or a
    folder without a config is assumed to."""
    if args.qlora:
        return True
    for path in filter(None, (args.model, args.language_model, args.vision_tower)):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            return True
        with open(config, encoding="utf-8") as f:
            if "quantization_config" in f.read():
                return True
    return False


# ---- evaluate -----------------------------------------------------------------------------------------------------
def evaluate_retrieval(args) -> int:
    import json

    from tqdm.auto import tqdm

    from vlm_fusion.evaluation import retrieval
    from vlm_fusion.training import DataError

    try:
        path = resolve_model(args.model)
    except ValueError as error:
        return fail(str(error))
    if os.path.isdir(path):  # a Hub id may still need the network
        quiet()
    try:
        retrieval.check_model_type(path)  # before the data: one line, in a moment
        samples = retrieval.read_samples(args.data, args.image_folder)
    except DataError as error:
        return fail(f"evaluate retrieval: {error}")
    try:
        model, processor = retrieval.load(path)
    except Exception as error:  # any reason a checkpoint does not load is one line here
        return fail(load_failure(path, error))
    metrics = retrieval.evaluate(model, processor, samples, k=args.k, batch_size=args.batch_size, progress=tqdm)
    output = args.output or os.path.join(path if os.path.isdir(path) else ".", "retrieval_results.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    setup = {"model": args.model, "data": args.data, "images": len(samples.images), "texts": len(samples.texts),
             "k_test": args.k}
    with open(output, "w", encoding="utf-8") as f:
        json.dump({**metrics, "setup": setup}, f, indent=2)
    print("vlm-fusion evaluate retrieval: "
          + retrieval.report(metrics, images=len(samples.images), texts=len(samples.texts), k=args.k))
    print(f"written to {output}")
    return 0


# ---- convert ------------------------------------------------------------------------------------------------------
def convert(args, rest) -> int:
    module = importlib.import_module(f"vlm_fusion.conversion.{CONVERTERS[args.source]}")
    return module.main(rest, prog=f"vlm-fusion convert {args.source}")
