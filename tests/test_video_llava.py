"""Video in the LLaVA-style family: pooling modes, the clip's newline, and parity with transformers' LLaVA-NeXT-Video and
LLaVA-OneVision (tiny random checkpoints built from their configs, converted, same inputs)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessorPil

from conftest import assert_same_logits, load_script, random_image
from vlm_fusion import FusionLlavaConfig, FusionLlavaForConditionalGeneration, FusionLlavaProcessor
from vlm_fusion.conversion.common import ConversionError
from vlm_fusion.conversion.convert_llava_video import (
    convert_llava_next_video,
    convert_llava_onevision,
    reference_input_ids,
    without_video_processor,
)
from vlm_fusion.tools.tiny import tiny_model_and_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

convert_llava_video_script = load_script("convert_llava_video")  # the command-line entry point

# Float32 throughout, and both models run the same ops on the same weights in the same order (one sample agrees
# bit for bit); a left-padded batch reorders the attention's float32 sums (eps 1.2e-7) over a few 64-wide layers, so
# differences of a few 1e-7 on logits of magnitude ~1: 1e-4, the suite's float32 parity tolerance, leaves room.
ATOL = 1e-4
PROMPT = "USER: <image>\n<video>\nwhat is shown ? ASSISTANT:"
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 96], [128, 128]]
IMAGE_SIZES = [(40, 80), (130, 128), (90, 30)]  # (height, width): wide; large square (OneVision resizes it); tall
POOLINGS = [None, "average", "max", "bilinear"]


def clip(seed: int, frames: int = 4, size=(40, 48)) -> np.ndarray:
    """A random clip `(F, H, W, C)`, uint8."""
    return np.random.default_rng(seed).integers(0, 256, (frames, *size, 3), dtype=np.uint8)


def tokenizer_with_placeholders():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tokenizer


@pytest.fixture(scope="module", params=["average", "max"])
def next_video_dir(request, tmp_path_factory):
    """A tiny transformers LlavaNextVideoForConditionalGeneration (CLIP + Llama, 32 px tiles of 8 px patches), saved
    with its processor and video processor settings."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next_video.video_processing_llava_next_video import LlavaNextVideoVideoProcessor

    torch.manual_seed(0)
    tokenizer = tokenizer_with_placeholders()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = without_video_processor(LlavaNextVideoProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    config = LlavaNextVideoConfig(vision_config=tiny_vision_config("clip"),
                                  text_config=tiny_text_config("llama", vocab_size=len(tokenizer)),
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=PINPOINTS, spatial_pool_mode=request.param)
    path = tmp_path_factory.mktemp(f"llava_next_video_{request.param}")
    LlavaNextVideoForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    LlavaNextVideoVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    """A tiny transformers LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2, as OneVision, 32 px tiles of 8 px
    patches, `anyres_max_9`), saved with its processor and video processor settings."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    torch.manual_seed(0)
    tokenizer = tokenizer_with_placeholders()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS)
    processor = without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full")
    config = LlavaOnevisionConfig(vision_config=tiny_vision_config("siglip"),
                                  text_config=tiny_text_config("qwen2", vocab_size=len(tokenizer)),
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    path = tmp_path_factory.mktemp("llava_onevision")
    LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def check_parity(name, source_dir, converted_dir, model_cls, processor_cls, frame_processor=None):
    """For each image size, one image + one clip in a prompt: our input_ids are transformers' processor's, our frames
    `frame_processor`'s (a transformers PIL image processor with the video processor's settings; default: the source
    image processor's base tile, a plain resize), and the logits agree; then a batch of two."""
    reference = model_cls.from_pretrained(source_dir).eval()
    source_processor = without_video_processor(processor_cls).from_pretrained(source_dir)
    ours = AutoModelForImageTextToText.from_pretrained(converted_dir).eval()
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert isinstance(ours, FusionLlavaForConditionalGeneration) and isinstance(processor, FusionLlavaProcessor)
    counts = []
    for seed, size in enumerate(IMAGE_SIZES):
        image, video = random_image(seed, size=size), clip(seed)
        inputs = processor(images=image, videos=video, text=PROMPT, return_tensors="pt")
        assert torch.equal(inputs["input_ids"],
                           reference_input_ids(source_processor, image, PROMPT, inputs["pixel_values_videos"]))
        if frame_processor is None:
            frames = [source_processor.image_processor(f, return_tensors="pt")["pixel_values"][0, 0] for f in video]
        else:
            frames = [frame_processor(f, return_tensors="pt")["pixel_values"][0] for f in video]
        assert torch.equal(inputs["pixel_values_videos"][0], torch.stack(frames))
        assert torch.equal(inputs["pixel_values"], source_processor(images=image, text=PROMPT.replace("<video>", ""),
                                                                   return_tensors="pt")["pixel_values"])
        num_video = int((inputs["input_ids"] == processor.video_token_id).sum())
        counts.append(int((inputs["input_ids"] == processor.image_token_id).sum()))
        assert num_video == ours.config.num_video_tokens(4) and counts[-1] == ours.config.num_image_tokens(*size)
        assert_same_logits(f"{name} parity, a {size[0]}x{size[1]} image ({counts[-1]} tokens) + a 4-frame clip "
                           f"({num_video} tokens)", ours, reference, inputs, atol=ATOL)
    processor.tokenizer.padding_side = "left"
    images, videos = [random_image(7, size=IMAGE_SIZES[0]), random_image(8, size=IMAGE_SIZES[2])], [clip(7), clip(8)]
    batch = processor(images=images, videos=videos, text=[PROMPT, "USER: <image> <video> what ? ASSISTANT:"],
                      padding=True, return_tensors="pt")
    assert_same_logits(f"{name} parity, a batch of two", ours, reference, batch, atol=ATOL)
    return counts


def test_llava_next_video_converts_with_video_and_matches_transformers(next_video_dir, tmp_path):
    from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

    out = tmp_path / "fusion"
    convert_llava_next_video(next_video_dir, out)
    config = FusionLlavaConfig.from_pretrained(out)
    assert config.video_pooling in ("average", "max") and not config.video_newline and config.anyres_max_tiles is None
    # LlavaNextVideoVideoProcessor: shortest edge to 32, centre crop 32 x 32, bicubic, CLIP's mean and std, as CLIP's
    # image processor does (the LLaVA-NeXT image processor's base tile is a plain resize instead)
    frame_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    counts = check_parity(f"llava-next-video ({config.video_pooling})", next_video_dir, out,
                          LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor, frame_processor)
    assert len(set(counts)) == 3


def test_llava_onevision_converts_with_video_and_anyres_max_and_matches_transformers(onevision_dir, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    out = tmp_path / "fusion"
    assert convert_llava_video_script.main(["--source", "llava-onevision", "--input", str(onevision_dir),
                                            "--output", str(out)]) == 0
    config = FusionLlavaConfig.from_pretrained(out)
    assert (config.video_pooling, config.video_newline, config.anyres_max_tiles) == ("bilinear", True, 9)
    counts = check_parity("llava-onevision", onevision_dir, out, LlavaOnevisionForConditionalGeneration,
                          LlavaOnevisionProcessor)
    # the 130x128 image's 128x128 grid (16 tiles) is resized down to 9 tiles' worth: fewer tokens than 16 tiles give
    assert counts[1] < 16 + 16 * 16 + 16


def test_onevision_several_images_in_one_sample_are_refused(onevision_dir, tmp_path):
    out = tmp_path / "fusion"
    convert_llava_onevision(onevision_dir, out)
    processor = AutoProcessor.from_pretrained(out)
    with pytest.raises(ValueError, match="one image per sample"):
        processor(images=[[random_image(0), random_image(1)]], text="<image> <image> what ?", return_tensors="pt")


def test_conversion_refuses_an_unconsumed_key(onevision_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in onevision_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(bad / "model.safetensors")
    weights["model.vision_resampler.weight"] = torch.zeros(2)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="model.vision_resampler.weight"):
        convert_llava_onevision(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
