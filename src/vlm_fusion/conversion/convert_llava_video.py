"""Convert transformers' LLaVA-NeXT-Video and LLaVA-OneVision checkpoints into `fusion_llava` models that read clips.

    # LlavaNextVideoForConditionalGeneration (llava-hf/LLaVA-NeXT-Video-*): anyres images, frames average- or
    # max-pooled on their patch grid before the projector
    vlm-fusion convert llava-video --source llava-next-video --input DIR --output DIR
    # LlavaOnevisionForConditionalGeneration (llava-hf/llava-onevision-*): anyres_max_N images, frames bilinearly
    # halved after the projector, a newline after each clip
    vlm-fusion convert llava-video --source llava-onevision --input DIR --output DIR

From Python: `convert_llava_next_video(src, dst)`, `convert_llava_onevision(src, dst)`.

The weights go through the LLaVA table (`convert_llava.llava_hf_rules`): every source key consumed, every model weight
filled, or nothing is written. The processor gets a `FusionVideoProcessor` whose frame processor takes the source video
processor's settings (size, crop, resample, mean/std; read from `video_preprocessor_config.json`, since transformers'
video processors need torchvision). Before finishing, the written model and transformers' own class are run on one
image and one clip: the converted processor's `input_ids` must be what transformers' processor writes (its
`replace_video_token` on the same frames) and the logits must agree.
"""

import argparse
import inspect
import json
import os
import sys

import torch
from transformers import AutoConfig, CLIPImageProcessorPil

from vlm_fusion import FusionLlavaForConditionalGeneration, FusionLlavaProcessor
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image
from vlm_fusion.conversion.convert_llava import llava_hf_config, llava_hf_rules, llava_hf_source
from vlm_fusion.processing_video import FusionVideoProcessor
from vlm_fusion.vision import num_prefix_tokens

PROMPT = "USER: <image>\n<video>\nWhat happens in this clip? ASSISTANT:"
SAMPLE_FRAMES = 4  # frames of the sample clip, when the video processor does not sample a fixed number

SOURCE_TYPES = {"llava-next-video": "llava_next_video", "llava-onevision": "llava_onevision"}

# The settings of a video processor's frames that an image processor takes the same way.
FRAME_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def transformers_classes(source: str):
    """(model class, processor class, video processor class) of transformers for `--source`."""
    if source == "llava-next-video":
        from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
        from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

        return LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    return LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor


def video_fields(source: str, config) -> dict:
    """The fusion_llava fields of the source's video path (and OneVision's anyres_max_N)."""
    if source == "llava-next-video":
        if config.spatial_pool_mode not in ("average", "max"):
            raise ConversionError(f"spatial_pool_mode {config.spatial_pool_mode!r} is not supported (average, max).")
        return dict(video_pooling=config.spatial_pool_mode, video_pool_stride=config.spatial_pool_stride)
    aspect = config.vision_aspect_ratio
    if not (aspect.startswith("anyres_max_") and aspect[len("anyres_max_"):].isdigit()):
        raise ConversionError(f"vision_aspect_ratio {aspect!r} is not supported (anyres_max_N).")
    return dict(video_pooling="bilinear", video_pool_stride=2, video_newline=True,
                anyres_max_tiles=int(aspect[len("anyres_max_"):]))


def frame_processor(path: str, video_processor_cls) -> tuple[CLIPImageProcessorPil, dict]:
    """A PIL image processor with the source video processor's frame settings (its saved file over its class
    defaults), and those settings."""
    settings = {name: getattr(video_processor_cls, name, None) for name in (*FRAME_SETTINGS, "num_frames", "fps",
                                                                           "do_sample_frames")}
    file = os.path.join(path, "video_preprocessor_config.json")
    if os.path.exists(file):
        with open(file) as f:
            settings.update({k: v for k, v in json.load(f).items() if k in settings})
    image_settings = {k: settings[k] for k in FRAME_SETTINGS if settings[k] is not None}
    image_settings.setdefault("do_center_crop", False)
    return CLIPImageProcessorPil(**image_settings), settings


def without_video_processor(processor_cls):
    """transformers' processor class without its video processor (which needs torchvision): the image path and the
    text expansion as transformers writes them; `<video>` placeholders are expanded by the caller with the class's own
    `replace_video_token`, and its check that clips were passed is left out for them."""
    from transformers import ProcessorMixin

    attributes = processor_cls.get_attributes()  # the order the class hands its parts to ProcessorMixin

    class WithoutVideo(ProcessorMixin):  # between the class and ProcessorMixin in the MRO below
        def __init__(self, *args, **kwargs):
            kwargs.update(zip(attributes, args))
            kwargs.pop("video_processor", None)
            super().__init__(**kwargs)

    class ImagesAndText(processor_cls, WithoutVideo):
        @classmethod
        def get_attributes(cls):
            return [name for name in attributes if name != "video_processor"]

        @classmethod
        def from_pretrained(cls, path, **kwargs):
            """The saved tokenizer, image processor, chat template and settings (`processor_config.json`)."""
            from transformers import AutoImageProcessor, AutoTokenizer

            parameters = inspect.signature(processor_cls.__init__).parameters
            with open(os.path.join(path, "processor_config.json")) as f:
                settings = {k: v for k, v in json.load(f).items() if k in parameters and k not in attributes}
            template = os.path.join(path, "chat_template.jinja")
            if os.path.exists(template):
                with open(template) as f:
                    settings["chat_template"] = f.read()
            return cls(image_processor=AutoImageProcessor.from_pretrained(path),
                       tokenizer=AutoTokenizer.from_pretrained(path), **settings)

        def validate_inputs(self, images=None, text=None, videos=None, **kwargs):
            texts = [text] if isinstance(text, str) else text
            if texts is not None:
                texts = [t.replace(self.video_token, "") for t in texts]
            super().validate_inputs(images=images, text=texts, videos=videos, **kwargs)

    ImagesAndText.__name__ = processor_cls.__name__  # saved as `processor_class`, as the class itself saves it
    return ImagesAndText


def reference_input_ids(source_processor, images, prompt: str, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """The `input_ids` transformers' processor writes for `prompt` with `images` and the clips `pixel_values_videos`
    `(V, F, C, H, W)`: each `<video>` expanded by its `replace_video_token`."""
    pieces = prompt.split(source_processor.video_token)
    if len(pieces) - 1 != len(pixel_values_videos):
        raise ConversionError(f"{len(pieces) - 1} {source_processor.video_token} in the prompt, "
                              f"{len(pixel_values_videos)} clips.")
    video_inputs = {"pixel_values_videos": pixel_values_videos}
    text = pieces[0] + "".join(source_processor.replace_video_token(video_inputs, i) + piece
                               for i, piece in enumerate(pieces[1:]))
    return source_processor(images=images, text=text, return_tensors="pt")["input_ids"]


def sample_clip(num_frames: int, size: int = 96) -> list:
    """A deterministic clip: `num_frames` structured test images."""
    return [sample_image(size, seed=i) for i in range(num_frames)]


def convert_video(args):
    source = llava_hf_source(args, SOURCE_TYPES[args.source])
    strategy = source.vision_feature_select_strategy
    if strategy == "full" and num_prefix_tokens(source.vision_config) == 0:
        strategy = "default"  # a tower without CLS (SigLIP): every token is a patch either way
    model_cls, processor_cls, video_processor_cls = transformers_classes(args.source)
    config = llava_hf_config(
        source,
        vision_feature_select_strategy=strategy,
        video_token_id=source.video_token_id,
        image_grid_pinpoints=source.image_grid_pinpoints,
        **video_fields(args.source, source),
        origin=f"Converted from transformers' {model_cls.__name__} ({os.path.basename(os.path.abspath(args.input))}).",
    )
    state_dict = rename_keys(read_state_dict(args.input), llava_hf_rules(conversion.lm_base_prefix(config.text_config)))
    source_processor = without_video_processor(processor_cls).from_pretrained(args.input)
    frames, settings = frame_processor(args.input, video_processor_cls)
    per_frame, per_clip = config.video_token_counts()
    processor = FusionLlavaProcessor(
        image_processor=source_processor.image_processor,
        tokenizer=source_processor.tokenizer,
        chat_template=source_processor.chat_template,
        image_seq_length=config.num_image_tokens(),
        patch_size=source.vision_config.patch_size,
        anyres_max_tiles=config.anyres_max_tiles,
        video_processor=FusionVideoProcessor(frame_processor=frames, num_frames=settings["num_frames"],
                                             fps=settings["fps"], do_sample_frames=bool(settings["do_sample_frames"])),
        video_token=source_processor.video_token,
        video_tokens_per_frame=per_frame,
        video_tokens_per_clip=per_clip,
    )
    if processor.video_token_id != config.video_token_id or processor.image_token_id != config.image_token_id:
        raise ConversionError(f"The tokenizer's {processor.image_token} / {processor.video_token} ids "
                              f"({processor.image_token_id}, {processor.video_token_id}) are not the config's "
                              f"({config.image_token_id}, {config.video_token_id}).")
    num_frames = settings["num_frames"] if settings["do_sample_frames"] and settings["num_frames"] else SAMPLE_FRAMES

    def verify(path):
        converted_processor = FusionLlavaProcessor.from_pretrained(path)
        model = FusionLlavaForConditionalGeneration.from_pretrained(path, dtype=args.dtype).eval()
        image, clip = sample_image(), sample_clip(num_frames)
        inputs = converted_processor(images=image, videos=[clip], text=PROMPT, return_tensors="pt")
        expected_ids = reference_input_ids(source_processor, image, PROMPT, inputs["pixel_values_videos"])
        if not torch.equal(inputs["input_ids"], expected_ids):
            raise ConversionError("The converted processor gives the sample prompt other `input_ids` than the source.")
        reference = model_cls.from_pretrained(args.input, dtype=args.dtype).eval()
        compare_logits(f"{args.source} vs converted (an image and a {num_frames}-frame clip)", model(**inputs).logits,
                       reference(**inputs).logits, args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionLlavaForConditionalGeneration,
                                config=config, state_dict=state_dict, processor=processor, verify=verify)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCE_TYPES), required=True)
    parser.add_argument("--input", required=True, help="checkpoint directory (a saved transformers model + processor)")
    conversion.add_common_arguments(parser)
    return conversion.check_common_arguments(parser, parser.parse_args(argv))


def main(argv=None, prog=None):
    return conversion.run(convert_video, parse_args(argv, prog))


def _convert(source: str, src, dst, *, dtype: str = "float32", atol: float | None = None, overwrite: bool = False):
    argv = ["--source", source, "--input", str(src), "--output", str(dst), "--dtype", dtype]
    argv += ["--atol", str(atol)] * (atol is not None) + ["--overwrite"] * overwrite
    convert_video(parse_args(argv))  # a ConversionError propagates to the caller


def convert_llava_next_video(src, dst, **kwargs) -> None:
    """Convert the `LlavaNextVideoForConditionalGeneration` checkpoint folder `src` into a fusion_llava model at `dst`
    (keyword arguments: `dtype`, `atol`, `overwrite`). Raises `ConversionError` if it does not convert exactly."""
    _convert("llava-next-video", src, dst, **kwargs)


def convert_llava_onevision(src, dst, **kwargs) -> None:
    """Convert the `LlavaOnevisionForConditionalGeneration` checkpoint folder `src` into a fusion_llava model at `dst`
    (keyword arguments: `dtype`, `atol`, `overwrite`). Raises `ConversionError` if it does not convert exactly."""
    _convert("llava-onevision", src, dst, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
