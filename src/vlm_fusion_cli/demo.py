"""`vlm-fusion demo`: the shipped demo checkpoints answer questions about a fresh synthetic image (`--video`: about
fresh clips, questions no single frame answers)."""

import os

from .common import FAMILY_NAMES, fail, quiet


def add_arguments(p) -> None:
    p.add_argument("--family", choices=FAMILY_NAMES + ("all",), default="all")
    p.add_argument("--seed", type=int, default=None, help="the image's seed (default: a fresh one)")
    p.add_argument("--save-image", metavar="PNG", help="also save the image (upscaled 4x)")
    p.add_argument("--video", action="store_true", help="ask about clips instead: one of each temporal question "
                   "(which way a shape moves, which appears last, how many times one blinks), 8 frames each")
    p.add_argument("--save-clips", metavar="PREFIX", help="with --video: also save the clips as animated GIFs "
                   "(PREFIX_direction.gif, ...; upscaled 4x, 2 frames a second)")


def run(args) -> int:
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    import torch  # lazy: import time

    threads = torch.get_num_threads()
    if args.save_clips and not args.video:
        return fail("--save-clips saves the clips of --video: add --video (or use --save-image for the image)")
    try:
        return ask_the_demo_models(args)
    finally:  # a caller's process (the tests) keeps its own
        torch.set_num_threads(threads)


def ask_the_demo_models(args) -> int:
    import numpy as np  # lazy: import time
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_fusion.demo import checkpoint, shapes

    quiet()
    # The demo models are a few MB: on them torch's intra-op threads cost more than they give (answers 1.7 s against
    # 21 s with 2 threads, 2 busy cores), so one thread; `generate` and the others keep torch's default for any model
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    asked = clips_asked(rng, args) if args.video else image_asked(rng, args)
    for family in FAMILY_NAMES if args.family == "all" else (args.family,):
        path = checkpoint(family)
        if not os.path.isdir(path):
            return fail(f"the {family} demo checkpoint is missing from the installed package ({path}).")
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        processor = AutoProcessor.from_pretrained(path)
        print(f"\n{type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters):")
        score = 0
        if args.video and getattr(processor, "video_processor", None) is None:
            return fail(f"the {family} demo checkpoint reads no clips ({path}).")
        for media, prompt, question, truth in asked:
            inputs = processor(**media, text=[prompt.format(question=question)], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=shapes.MAX_ANSWER_TOKENS, do_sample=False)
            answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            right = answer == truth
            score += right
            verdict = "-> right" if right else f'-> WRONG, expected "{truth}"'
            print(f"  Q: {question:<40} A: {chr(34) + answer + chr(34):<54} {verdict}")
        print(f"  {score}/{len(asked)} right")
    return 0


def image_asked(rng, args) -> list:
    """A fresh scene and its questions: `(processor inputs, prompt, question, answer)` each."""
    from vlm_fusion.demo import shapes

    scene = shapes.sample_scene(rng)
    image = shapes.render(scene)
    if args.save_image:
        image.resize((4 * shapes.IMAGE_SIZE,) * 2, 0).save(args.save_image)
    print(f"A fresh synthetic image (seed {args.seed}): {shapes.caption(scene)}"
          + (f" Saved to {args.save_image}." if args.save_image else ""))
    asked = shapes.questions(scene, rng) + [("caption", shapes.CAPTION_QUESTION, shapes.caption(scene))]
    return [({"images": [image]}, shapes.PROMPT, question, truth) for _, question, truth in asked]


def clips_asked(rng, args) -> list:
    """A fresh clip for each temporal question type, its question and answer."""
    from vlm_fusion.demo import clips, shapes

    asked = []
    print(f"Fresh synthetic clips (seed {args.seed}), {clips.NUM_FRAMES} frames each:")
    for kind in clips.TEMPORAL_TYPES:
        clip, question, truth = clips.sample_clip(rng, kind)
        frames = clips.render_clip(clip)
        shown = " ".join(str(sum(track.cells[f] is not None for track in clip)) for f in range(clips.NUM_FRAMES))
        saved = ""
        if args.save_clips:
            saved = f" Saved to {args.save_clips}_{kind}.gif."
            big = [frame.resize((4 * shapes.IMAGE_SIZE,) * 2, 0) for frame in frames]
            big[0].save(f"{args.save_clips}_{kind}.gif", save_all=True, append_images=big[1:], duration=500, loop=0)
        scene = shapes.caption([track.item for track in clip])[:-2]
        print(f"  {kind}: {scene}; shapes shown per frame: {shown}.{saved}")
        asked.append(({"videos": [clips.as_array(frames)]}, clips.PROMPT, question, truth))
    return asked
