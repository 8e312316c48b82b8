"""`vlm-fusion generate`: answer a prompt about an image or a clip; also the prompt and loading `explain` uses."""

import os

from .common import MODEL_HELP, fail, load_failure, positive_int, quiet, resolve_model


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--image", help="an image file")
    p.add_argument("--video", help="a video file (read with PyAV) or a frames folder, for a model whose processor reads "
                   "clips")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="frames sampled from --video, uniformly (default: the video processor's)")
    p.add_argument("--prompt", required=True, help="the question; it is put in the model's chat template")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as it is, no chat template (<image> marks the image; default: before the text)")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)


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
    from PIL import Image, UnidentifiedImageError  # lazy: import time

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
    from transformers import AutoModelForImageTextToText, AutoProcessor  # lazy: import time

    import vlm_fusion  # noqa: F401  (registers the families with the Auto classes)

    if os.path.isdir(path):  # a Hub id may still need the network
        quiet()
    try:
        return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    except Exception as error:  # any reason a checkpoint does not load is one line here
        return load_failure(path, error)


def run(args) -> int:
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
    import torch  # lazy: import time

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
