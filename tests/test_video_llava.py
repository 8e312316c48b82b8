"""Video in the LLaVA-style family: pooling modes, the clip's newline, and parity with transformers'
LLaVA-NeXT-Video and LLaVA-OneVision (tiny random checkpoints built from their configs, converted, same inputs)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessorPil

from conftest import assert_reordered, assert_same_logits, load_script, random_image
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
    video_processor = LlavaNextVideoVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    video_processor.save_pretrained(path)
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
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=16,
        vision_feature_select_strategy="full")
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
                           f"({num_video} tokens)", ours, reference, inputs)
    processor.tokenizer.padding_side = "left"
    images, videos = [random_image(7, size=IMAGE_SIZES[0]), random_image(8, size=IMAGE_SIZES[2])], [clip(7), clip(8)]
    batch = processor(images=images, videos=videos, text=[PROMPT, "USER: <image> <video> what ? ASSISTANT:"],
                      padding=True, return_tensors="pt")
    assert_same_logits(f"{name} parity, a batch of two", ours, reference, batch)
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


# ---- the family's video path on tiny models ---------------------------------------------------------------------
def video_model(video_pooling=None, **kwargs):
    return tiny_model_and_processor("fusion_llava", video=True, num_frames=4, video_pooling=video_pooling, **kwargs)


@pytest.mark.parametrize("video_pooling", POOLINGS)
@pytest.mark.parametrize("video_newline", [False, True])
def test_each_pooling_gives_the_configs_count_and_the_processors_placeholders(video_pooling, video_newline):
    model, processor = video_model(video_pooling, video_newline=video_newline, video_pool_stride=3)
    inputs = processor(videos=clip(0, frames=6), text="<video> what is shown ?", return_tensors="pt")
    placeholders = int((inputs["input_ids"] == processor.video_token_id).sum())
    with torch.no_grad():
        tokens = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    # 32 px frames of 8 px patches: a 4 x 4 grid; stride 3 pools it to 1 x 1 (floor), resizes it to 2 x 2 (ceil)
    side = {None: 4, "average": 1, "max": 1, "bilinear": 2}[video_pooling]
    assert tokens.shape == (1, model.config.num_video_tokens(4), 64) and placeholders == tokens.shape[1]
    assert model.config.num_video_tokens(4) == 4 * side * side + video_newline
    if video_newline:  # the clip ends with the learned newline
        assert torch.equal(tokens[0, -1], model.model.image_newline)


def test_average_and_max_pool_the_vision_features_before_the_projector_bilinear_after():
    model, processor = video_model("average")
    pixels = processor(videos=clip(1), text="<video>", return_tensors="pt")["pixel_values_videos"]
    features, _ = model.model.get_vision_features(pixels.flatten(0, 1))  # (4, 16, 64): 4 frames of 4 x 4 patches
    grid = features.unflatten(1, (4, 4))  # (F, 4, 4, D_v)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        pooled = grid.unflatten(1, (2, 2)).unflatten(3, (2, 2))  # (F, 2, 2, 2, 2, D_v): rows and columns in pairs
        expected = {"average": projector(pooled.mean((2, 4)).flatten(1, 2)),
                    "max": projector(pooled.amax((2, 4)).flatten(1, 2))}
        for mode, want in expected.items():
            model.config.video_pooling = mode
            assert_reordered(model.model.encode_videos(features[None])[0], want.flatten(0, 1))
        # bilinear halving of an even grid (align_corners=False) is the mean of each 2 x 2 block, after the projector
        model.config.video_pooling = "bilinear"
        want = projector(grid).unflatten(1, (2, 2)).unflatten(3, (2, 2)).mean((2, 4)).flatten(1, 2)
        assert_reordered(model.model.encode_videos(features[None])[0], want.flatten(0, 1))


def test_images_and_a_video_in_one_prompt_each_fill_their_own_positions():
    model, processor = video_model("bilinear", video_newline=True)
    text = "USER: <image> <video> what is shown ? ASSISTANT:"
    inputs = processor(images=random_image(0), videos=clip(0), text=text, return_tensors="pt")
    ids = inputs["input_ids"][0]
    image_at = (ids == processor.image_token_id).nonzero()[:, 0]
    video_at = (ids == processor.video_token_id).nonzero()[:, 0]
    assert len(image_at) == model.config.num_image_tokens() and len(video_at) == model.config.num_video_tokens(4)
    with torch.no_grad():
        embeds, _ = model.model.embed_inputs(inputs["input_ids"], None, inputs["pixel_values"])
        spliced, _ = model.model.embed_videos(inputs["input_ids"], embeds, inputs["pixel_values_videos"])
        expected = model.model.get_input_embeddings()(ids.masked_fill(ids >= model.config.text_config.vocab_size, 0))
        expected[image_at] = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
        expected[video_at] = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
        assert torch.equal(spliced[0], expected)
        # another clip changes nothing before the video's first position
        other = processor(images=random_image(0), videos=clip(5), text=text, return_tensors="pt")
        first = int(video_at[0])
        assert torch.equal(model(**inputs).logits[:, :first], model(**other).logits[:, :first])
        assert not torch.equal(model(**inputs).logits[:, first:], model(**other).logits[:, first:])


def test_cached_and_uncached_generation_with_a_video_agree():
    model, processor = video_model("average")
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[random_image(0), random_image(1)], videos=[clip(0), clip(1)], padding=True,
                       text=["<image> <video> what is shown ?", "<video> how many shapes are there in <image> ?"],
                       return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        beams = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_beams=2)
    assert torch.equal(cached, uncached) and beams.shape[0] == 2


def test_save_and_load_round_trip_model_and_processor_exactly(tmp_path):
    model, processor = video_model("bilinear", video_newline=True, video_pool_stride=3,
                                   image_grid_pinpoints=[[32, 64], [64, 32]], anyres_max_tiles=1)
    processor = FusionLlavaProcessor(image_processor=_anyres_image_processor([[32, 64], [64, 32]]),
                                     tokenizer=processor.tokenizer, patch_size=8, anyres_max_tiles=1,
                                     video_processor=processor.video_processor,
                                     video_tokens_per_frame=processor.video_tokens_per_frame,
                                     video_tokens_per_clip=processor.video_tokens_per_clip)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert "model.image_newline" in loaded.state_dict()
    for field in ("video_pooling", "video_pool_stride", "video_newline", "anyres_max_tiles", "video_token_id"):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    text = "<image> <video> what is shown ?"
    inputs = processor(images=random_image(0, size=(40, 80)), videos=clip(2), text=text, return_tensors="pt")
    again = loaded_processor(images=random_image(0, size=(40, 80)), videos=clip(2), text=text, return_tensors="pt")
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)


def _anyres_image_processor(pinpoints):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      image_grid_pinpoints=pinpoints)


def test_a_video_token_count_mismatch_raises_with_both_counts():
    model, processor = video_model("max", video_newline=True)
    inputs = processor(videos=clip(0), text="<video> what is shown ?", return_tensors="pt")
    ids = inputs["input_ids"]
    first = int((ids[0] == processor.video_token_id).nonzero()[0, 0])
    short = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # one placeholder fewer
    with pytest.raises(ValueError, match=r"holds 16 video tokens .* give 17 features"):
        model(input_ids=short, pixel_values_videos=inputs["pixel_values_videos"])


@pytest.mark.parametrize("fields, message", [
    (dict(video_pooling="mean"), "video_pooling"),
    (dict(video_pooling="average", video_pool_stride=0), "video_pool_stride"),
    (dict(video_pooling="average", video_pool_stride=5), "video_pool_stride"),
    (dict(video_newline="yes"), "video_newline"),
    (dict(video_pooling="bilinear", vision_feature_select_strategy="full"), "patch grid"),
    (dict(anyres_max_tiles=9), "anyres_max_tiles"),
    (dict(anyres_max_tiles=0, image_grid_pinpoints=[[32, 64]]), "anyres_max_tiles"),
])
def test_bad_video_fields_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        FusionLlavaConfig(vision_config=tiny_vision_config("clip"), text_config=tiny_text_config("llama"), **fields)


def test_explain_reads_an_anyres_max_grid_at_its_resized_shape():
    from vlm_fusion.explain import explain

    grids = [[32, 64], [64, 64]]
    model, processor = video_model(image_grid_pinpoints=grids, anyres_max_tiles=1)
    processor = FusionLlavaProcessor(image_processor=_anyres_image_processor(grids), tokenizer=processor.tokenizer,
                                     patch_size=8, anyres_max_tiles=1)
    # a 64x64 grid: 8 x 8 features, sqrt(64 / 16) = 2 > 1.1, so resized to 4 x 4 (4 newlines): 16 + 16 + 4 tokens
    assert model.config.num_image_tokens(60, 60) == 36
    result = explain(model, processor, [random_image(0, size=(60, 60))], "<image> what is shown ?", max_new_tokens=2)
    assert result.layer_maps[0].shape[-2:] == (4, 4)
    torch.testing.assert_close(result.maps()[0].sum((-1, -2)), torch.ones(len(result.tokens)))


def assert_refused(source_dir, source, edit: dict, message, tmp_path, capsys):
    """Converting `source_dir` with `edit` written into its config.json fails in one line and writes nothing."""
    import json

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in source_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **edit}))
    assert convert_llava_video_script.main(["--source", source, "--input", str(bad),
                                            "--output", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_next_video_conv_pooling_is_refused_in_one_line(next_video_dir, tmp_path, capsys):
    assert_refused(next_video_dir, "llava-next-video", {"spatial_pool_mode": "conv"},
                   "spatial_pool_mode 'conv' is not supported (average, max).", tmp_path, capsys)


def test_onevision_without_anyres_max_is_refused_in_one_line(onevision_dir, tmp_path, capsys):
    assert_refused(onevision_dir, "llava-onevision", {"vision_aspect_ratio": "anyres"},
                   "vision_aspect_ratio 'anyres' is not supported (anyres_max_N).", tmp_path, capsys)
