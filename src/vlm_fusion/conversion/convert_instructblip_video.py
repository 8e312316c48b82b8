"""Convert transformers' InstructBlipVideoForConditionalGeneration (InstructBLIP-Video) into a `fusion_blip2` model
with `video_bridge="per_frame"` and its instruction-aware processor.

    vlm-fusion convert instructblip-video --input DIR --output DIR
    python conversion_scripts/convert_instructblip_video.py --input DIR --output DIR

The weights are InstructBLIP's under InstructBLIP's names (`convert_blip2`'s tables map them); the vision tower is
InstructBLIP's EVA ViT (its config only renamed); each clip's frames all go through the Q-Former with the sample's
instruction and take `num_query_tokens` `<video>` positions each, in front of the tokenized prompt, BOS included, as
InstructBLIP-Video writes them. The processor is a `FusionInstructBlipProcessor` with a `FusionVideoProcessor` whose
frames go through `BlipImageProcessorPil` with the source video processor's settings (transformers' own video
processor needs torchvision) and its frame sampling (`do_sample_frames`, `num_frames`, `fps`). One difference, on
purpose: `InstructBlipVideoProcessor` writes 4 frames' placeholders whatever the clip holds; ours writes F x N_q for a
clip of F frames and never drops a frame.

Every source key must be consumed and every model weight filled, or nothing is written. Before finishing, the script
loads what it wrote and compares, on a 4-frame sample clip and the sample prompt: the `input_ids`,
`qformer_input_ids` and `qformer_attention_mask` with what `InstructBlipVideoProcessor.__call__` itself writes (run
with a stand-in for its video processor), then the logits with transformers' own class on the same pixels.
"""

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoTokenizer, InstructBlipVisionConfig
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from vlm_fusion import FusionBlip2Config, FusionBlip2ForConditionalGeneration, FusionInstructBlipProcessor
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image
from vlm_fusion.conversion.blip2_common import qformer_fields
from vlm_fusion.conversion.convert_blip2 import instructblip_rules
from vlm_fusion.processing_video import FusionVideoProcessor

PROMPT = "Question: what happens in this video? Answer:"
SOURCE_FRAMES = 4  # the frames InstructBlipVideoProcessor writes placeholders for, whatever the clip
# The source video processor's settings a frame's pixels depend on (BlipImageProcessorPil takes them all).
FRAME_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def video_processor_dict(path: str) -> dict:
    """The source's video processor settings: `processor_config.json`'s `video_processor` (transformers 5), else
    `video_preprocessor_config.json`, else `preprocessor_config.json` (older saves)."""
    candidates = (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None),
                  ("preprocessor_config.json", None))
    for name, key in candidates:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                settings = json.load(f)
            settings = settings.get(key) if key else settings
            if settings:
                return settings
    raise ConversionError(f"{path} holds no video processor settings (processor_config.json's `video_processor`, "
                          "video_preprocessor_config.json or preprocessor_config.json).")


def video_processor(settings: dict) -> FusionVideoProcessor:
    """Ours for the source's settings: each frame through `BlipImageProcessorPil` with them, frames sampled as the
    source samples them (by default InstructBLIP-Video keeps every frame given)."""
    frames = BlipImageProcessorPil(**{key: settings[key] for key in FRAME_SETTINGS if key in settings})
    sample = bool(settings.get("do_sample_frames", False))
    return FusionVideoProcessor(frames, num_frames=settings.get("num_frames") if sample else None,
                                fps=settings.get("fps") if sample else None, do_sample_frames=sample)


def source_text_inputs(tokenizer, qformer_tokenizer, num_query_tokens: int, prompt: str) -> dict:
    """What transformers' `InstructBlipVideoProcessor` writes for `prompt` and one clip: its own `__call__`, run with
    a stand-in for its video processor (torchvision's; the pixels are not compared here)."""
    from transformers import AddedToken, InstructBlipVideoProcessor

    stand_in = SimpleNamespace(tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                               num_query_tokens=num_query_tokens,
                               video_token=AddedToken("<video>", normalized=False, special=True),  # its __init__'s
                               video_processor=lambda videos, return_tensors=None: {})
    inputs = InstructBlipVideoProcessor.__call__(stand_in, images=[[None]], text=prompt, return_tensors="pt")
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask")}


def convert(args):
    source = AutoConfig.from_pretrained(args.input)
    if source.model_type != "instructblipvideo":
        raise ConversionError(f"{args.input} holds a {source.model_type!r} config, not `instructblipvideo`.")
    if not getattr(source, "use_decoder_only_language_model", True):
        raise ConversionError("Encoder-decoder (T5) checkpoints are not supported: the LM must be causal.")
    tokenizer = AutoTokenizer.from_pretrained(args.input)
    qformer_tokenizer = AutoTokenizer.from_pretrained(args.input, subfolder="qformer_tokenizer")
    settings = video_processor_dict(args.input)
    processor = FusionInstructBlipProcessor(
        image_processor=BlipImageProcessorPil(**{key: settings[key] for key in FRAME_SETTINGS if key in settings}),
        tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, image_seq_length=source.num_query_tokens,
        video_processor=video_processor(settings), video_tokens_per_frame=source.num_query_tokens)
    if source.video_token_index != processor.video_token_id:
        raise ConversionError(f"The config's video token {source.video_token_index} is not the tokenizer's <video> "
                              f"({processor.video_token_id}).")
    vision = {k: v for k, v in source.vision_config.to_dict().items()
              if k not in ("model_type", "transformers_version")}
    config = FusionBlip2Config(
        vision_config=InstructBlipVisionConfig(**vision),  # InstructBLIP-Video's tower is InstructBLIP's
        text_config=source.text_config,
        num_query_tokens=source.num_query_tokens,
        vision_layer_norm_eps=source.vision_config.layer_norm_eps,  # its post_layernorm
        image_token_id=processor.image_token_id,  # single images too: the same Q-Former reads one frame
        video_token_id=processor.video_token_id,
        video_bridge="per_frame",
        origin="Converted from transformers' InstructBlipVideoForConditionalGeneration (InstructBLIP-Video).",
        **qformer_fields(source.qformer_config, text=True),
    )
    rules = instructblip_rules(conversion.lm_base_prefix(config.text_config))  # InstructBLIP's names, all of them
    state_dict = rename_keys(read_state_dict(args.input), rules)
    for name in ("weight", "bias"):  # transformers norms inside the tower; our bridge norms the selected layer
        state_dict[f"vision_layernorm.{name}"] = state_dict[f"vision_tower.post_layernorm.{name}"].clone()

    def verify(path):
        from transformers import AutoProcessor, InstructBlipVideoForConditionalGeneration

        ours = AutoProcessor.from_pretrained(path)
        model = FusionBlip2ForConditionalGeneration.from_pretrained(path, dtype=args.dtype).eval()
        clip = [sample_image(seed=i) for i in range(SOURCE_FRAMES)]
        inputs = ours(videos=[clip], text=PROMPT, do_sample_frames=False, return_tensors="pt")
        expected = source_text_inputs(AutoTokenizer.from_pretrained(args.input),  # as saved, no <image> added
                                      AutoTokenizer.from_pretrained(args.input, subfolder="qformer_tokenizer"),
                                      source.num_query_tokens, PROMPT)
        for key, value in expected.items():
            if not torch.equal(inputs[key], value):
                raise ConversionError(f"The converted processor gives the sample prompt other `{key}` than "
                                      "InstructBlipVideoProcessor.")
        reference = InstructBlipVideoForConditionalGeneration.from_pretrained(args.input, dtype=args.dtype).eval()
        compare_logits("instructblip-video vs converted", model(**inputs).logits,
                       reference(**expected, pixel_values=inputs["pixel_values_videos"]).logits, args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionBlip2ForConditionalGeneration,
                                config=config, state_dict=state_dict, processor=processor, verify=verify)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an InstructBlipVideoForConditionalGeneration directory with "
                        "its processor (tokenizer, qformer_tokenizer/, video processor settings)")
    conversion.add_common_arguments(parser)
    return conversion.check_common_arguments(parser, parser.parse_args(argv))


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    return conversion.run(convert, args)


def convert_instructblip_video(src: str, dst: str, *, dtype: str = "float32", atol: float | None = None,
                               overwrite: bool = False, prog: str | None = None) -> int:
    """Convert the InstructBlipVideoForConditionalGeneration directory `src` into `dst`; the exit code (0, or 1 with
    the problem on stderr)."""
    argv = ["--input", str(src), "--output", str(dst), "--dtype", dtype]
    argv += (["--atol", str(atol)] if atol is not None else []) + (["--overwrite"] if overwrite else [])
    return main(argv, prog)


if __name__ == "__main__":
    sys.exit(main())
