"""Clips in the BLIP-2-style family: InstructBLIP-Video parity through the converter (per-frame bridge), Video-LLaMA's
video Q-Former, token counts, cache, instruction per sample, mixed prompts, round trips, count errors."""

import json

import pytest
import torch
from tokenizers import processors
from transformers import (
    AddedToken,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    InstructBlipVideoConfig,
    InstructBlipVideoForConditionalGeneration,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from conftest import assert_reordered, assert_same_logits, load_script, random_image
from vlm_fusion import FusionBlip2Config, FusionInstructBlipProcessor
from vlm_fusion.conversion.convert_instructblip_video import convert_instructblip_video, source_text_inputs
from vlm_fusion.tools.tiny import WORDS, tiny_model_and_processor, tiny_text_config, tiny_tokenizer, tiny_vision_config

N_Q = 8
PROMPTS = ["Question: what is shown ? Answer:", "Question: how many shapes are there in this image ? Answer:"]


def clip(num_frames: int, seed: int = 0) -> list:
    return [random_image(seed * 100 + i) for i in range(num_frames)]


def with_bos(tokenizer):
    """The tiny word-level tokenizer, adding BOS as OPT's and Vicuna's do: where BOS lands is part of the layout."""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    return tokenizer


@pytest.fixture(scope="module")
def instructblip_video_dir(tmp_path_factory):
    """A tiny transformers InstructBlipVideoForConditionalGeneration (EVA ViT + OPT) saved as transformers saves it
    with its processor: tokenizer (`<video>` added as InstructBlipVideoProcessor adds it), `qformer_tokenizer/`, and
    the video processor's settings in processor_config.json (written by hand: the class needs torchvision)."""
    torch.manual_seed(0)
    tokenizer = with_bos(tiny_tokenizer())
    tokenizer.add_tokens([AddedToken("<video>", normalized=False, special=True)], special_tokens=True)
    qformer_tokenizer = tiny_tokenizer(list(reversed(WORDS)))  # other ids for the same words
    vision = {k: v for k, v in tiny_vision_config("clip").items() if k != "model_type"}
    config = InstructBlipVideoConfig(
        vision_config=vision,
        qformer_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                            cross_attention_frequency=2, vocab_size=len(qformer_tokenizer), max_position_embeddings=32,
                            pad_token_id=qformer_tokenizer.pad_token_id),
        text_config=tiny_text_config("opt", vocab_size=len(tokenizer)),
        num_query_tokens=N_Q, video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    )
    model = InstructBlipVideoForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms, queries and text embeddings
        for name, param in model.named_parameters():
            if "layernorm" in name.lower() or "query_tokens" in name or name.endswith("bias") or "embeddings" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path_factory.mktemp("instructblip_video_hf")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    qformer_tokenizer.save_pretrained(path / "qformer_tokenizer")
    frames = BlipImageProcessorPil(size={"height": 32, "width": 32}).to_dict()
    frames.update(video_processor_type="InstructBlipVideoVideoProcessor", do_sample_frames=False)
    (path / "processor_config.json").write_text(json.dumps(
        {"video_processor": frames, "num_query_tokens": N_Q, "processor_class": "InstructBlipVideoProcessor"}))
    return path


@pytest.fixture(scope="module")
def converted(instructblip_video_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "fusion"
    script = load_script("convert_instructblip_video")
    assert script.main(["--input", str(instructblip_video_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ours(converted):
    return AutoModelForImageTextToText.from_pretrained(converted).eval(), AutoProcessor.from_pretrained(converted)


def test_instructblip_video_converts_and_matches_transformers(instructblip_video_dir, ours, tmp_path):
    model, processor = ours
    assert isinstance(processor, FusionInstructBlipProcessor) and processor.video_processor is not None
    assert model.config.video_bridge == "per_frame" and model.config.qformer_text_input
    source = lambda sub="": AutoTokenizer.from_pretrained(instructblip_video_dir, subfolder=sub)  # noqa: E731
    # The text streams: what InstructBlipVideoProcessor's own __call__ writes for a clip (its 4 frames' placeholders,
    # then the tokenized prompt, BOS included).
    mine = processor(videos=[clip(4)], text=PROMPTS[0], return_tensors="pt")
    theirs = source_text_inputs(source(), source("qformer_tokenizer"), N_Q, PROMPTS[0])
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(mine[key], theirs[key]), key
    assert mine["input_ids"][0, 4 * N_Q].item() == processor.tokenizer.bos_token_id
    # The pixels: each frame through the PIL image processor of the source video processor's settings.
    expected = BlipImageProcessorPil(size={"height": 32, "width": 32})(clip(4), return_tensors="pt")["pixel_values"]
    assert torch.equal(mine["pixel_values_videos"][0], expected)

    reference = InstructBlipVideoForConditionalGeneration.from_pretrained(instructblip_video_dir).eval()
    as_reference = lambda inputs: {**{k: v for k, v in inputs.items() if k != "pixel_values_videos"},  # noqa: E731
                                   "pixel_values": inputs["pixel_values_videos"]}
    assert_same_logits("instructblip-video parity, 4 frames", model, reference, mine, as_reference(mine))
    # Two samples of other lengths (both streams padded), and clips of 8 frames: ours keeps every frame
    # (8 x N_q placeholders), which transformers' model reads as well (its processor would write 4 frames' worth).
    processor.tokenizer.padding_side = "left"  # for generation
    try:
        batch = processor(videos=[clip(8, 1), clip(8, 2)], text=PROMPTS, padding=True, return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = "right"
    placeholders = (batch["input_ids"] == model.config.video_token_id).sum(-1).tolist()
    assert placeholders == [model.config.num_video_tokens(8)] * 2
    assert model.config.num_video_tokens(8) == 8 * N_Q
    assert_same_logits("instructblip-video parity, 2 samples x 8 frames", model, reference, batch, as_reference(batch))
    with torch.no_grad():
        greedy = model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(greedy, reference.generate(**as_reference(batch), max_new_tokens=6, do_sample=False))


def test_convert_entry_refuses_a_checkpoint_of_another_kind(converted, tmp_path, capsys):
    assert convert_instructblip_video(converted, tmp_path / "again") == 1  # a fusion_blip2 folder, not the source
    assert "not `instructblipvideo`" in capsys.readouterr().err and not (tmp_path / "again").exists()


@pytest.mark.parametrize("bridge,frames", [("per_frame", 3), ("video_qformer", 3), ("video_qformer", 5)])
def test_token_counts_match_the_config_and_the_placeholders(bridge, frames):
    model, processor = tiny_model_and_processor("fusion_blip2", video=True, num_frames=frames, video_bridge=bridge,
                                                num_video_query_tokens=6, max_num_frames=5)
    inputs = processor(videos=[clip(frames)], text="<video> what is shown ?", return_tensors="pt")
    expected = frames * model.config.num_query_tokens if bridge == "per_frame" else 6
    assert model.config.num_video_tokens(frames) == expected == processor.num_video_tokens(frames)
    assert (inputs["input_ids"] == model.config.video_token_id).sum() == expected
    with torch.no_grad():
        tokens = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        assert tokens.shape == (1, expected, model.config.text_config.hidden_size)
        model(**inputs)
    if bridge == "video_qformer":
        assert {"frame_position_embedding", "video_qformer", "video_projection"} <= set(model.model.bridge_modules())
        # Cross-attention alone cannot tell the frames' order; the frame-position embedding does.
        with torch.no_grad():
            reversed_tokens = model.model.get_video_features(inputs["pixel_values_videos"].flip(1)).pooler_output
            assert not torch.allclose(reversed_tokens, tokens)
            model.model.frame_position_embedding.weight.zero_()
            unordered = [model.model.get_video_features(v).pooler_output
                         for v in (inputs["pixel_values_videos"], inputs["pixel_values_videos"].flip(1))]
            # without positions, the same keys in another order: equal up to float32 summation order
            assert_reordered(unordered[0], unordered[1])
        with pytest.raises(ValueError, match="longer than the frame-position embedding's `max_num_frames` \\(5\\)"):
            model.model.get_video_features(torch.zeros(1, 6, 3, 32, 32))


@pytest.mark.parametrize("bridge", ["per_frame", "video_qformer"])
def test_cached_and_uncached_generation_agree_with_a_video(bridge):
    model, processor = tiny_model_and_processor("fusion_blip2", video=True, num_frames=3, video_bridge=bridge)
    inputs = processor(videos=[clip(3)], text="<video> what is shown ?", return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cached_and_uncached_generation_agree_instruction_aware(ours):
    model, processor = ours
    inputs = processor(videos=[clip(3)], text=PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(cached, model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False))
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)  # clips follow their beams
    assert beams.shape[0] == 1


def test_each_sample_reads_its_own_instruction_with_every_frame(ours):
    model, processor = ours
    videos = [clip(3, 1), clip(3, 2)]
    batch = processor(videos=videos, text=PROMPTS, padding=True, return_tensors="pt")  # right padding
    with torch.no_grad():
        logits = model(**batch).logits
        for i, prompt in enumerate(PROMPTS):
            alone = processor(videos=[videos[i]], text=prompt, return_tensors="pt")
            length = alone["input_ids"].shape[1]
            # The same float32 ops on other batch shapes (BLAS may block them differently)
            assert_reordered(logits[i, :length], model(**alone).logits[0])
        # The instruction matters: the first clip read with the second prompt's instruction gives other tokens.
        other = dict(batch, qformer_input_ids=batch["qformer_input_ids"].flip(0),
                     qformer_attention_mask=batch["qformer_attention_mask"].flip(0))
        assert not torch.allclose(model(**other).logits[0], logits[0])


def test_images_and_a_video_in_one_prompt(ours):
    model, processor = ours
    text = "<image> <video> " + PROMPTS[0]
    inputs = processor(images=[random_image(7)], videos=[clip(3)], text=text, return_tensors="pt")
    ids = inputs["input_ids"]
    assert (ids == model.config.image_token_id).sum() == N_Q and (ids == model.config.video_token_id).sum() == 3 * N_Q
    instruction = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask")}
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], **instruction).pooler_output
        video = model.model.get_video_features(inputs["pixel_values_videos"], **instruction).pooler_output
        embeds = model.get_input_embeddings()(ids.masked_fill(ids >= model.config.text_config.vocab_size, 0))
        embeds[ids == model.config.image_token_id] = image.flatten(0, 1)
        embeds[ids == model.config.video_token_id] = video.flatten(0, 1)
        spliced = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        assert torch.equal(model(**inputs).logits, spliced)


@pytest.mark.parametrize("bridge", ["per_frame", "video_qformer"])
def test_save_and_load_round_trip_is_exact(bridge, tmp_path):
    model, processor = tiny_model_and_processor("fusion_blip2", video=True, num_frames=3, video_bridge=bridge,
                                                num_video_query_tokens=5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    for field in ("video_token_id", "video_bridge", "max_num_frames", "num_video_query_tokens",
                  "video_qformer_num_hidden_layers"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    for field in ("video_token", "video_token_id", "video_tokens_per_frame", "video_tokens_per_clip"):
        assert getattr(loaded_processor, field) == getattr(processor, field), field
    assert loaded_processor.video_processor.to_dict() == processor.video_processor.to_dict()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = processor(videos=[clip(5)], text="<video> what is shown ?", return_tensors="pt")  # 5 frames, 3 sampled
    again = loaded_processor(videos=[clip(5)], text="<video> what is shown ?", return_tensors="pt")
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    assert inputs["pixel_values_videos"].shape[1] == 3
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)


def test_converted_round_trip_is_exact(ours, tmp_path):
    model, processor = ours
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded_processor, FusionInstructBlipProcessor)
    inputs, again = (p(videos=[clip(3)], text=PROMPTS[1], return_tensors="pt") for p in (processor, loaded_processor))
    assert inputs.keys() == again.keys() and all(torch.equal(inputs[k], again[k]) for k in inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**again).logits)


def test_count_mismatches_raise(ours):
    model, processor = ours  # instruction-aware: the instruction is shared out by the counts, which must add up
    inputs = processor(videos=[clip(3)], text=PROMPTS[0], return_tensors="pt")
    short = {k: (v[:, 1:] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    with pytest.raises(ValueError, match=f"Video features and video tokens do not match: the samples hold "
                                         f"\\[{3 * N_Q - 1}\\]"):
        model(**short)
    plain, plain_processor = tiny_model_and_processor("fusion_blip2", video=True, num_frames=3)
    inputs = plain_processor(videos=[clip(3)], text="<video> what is shown ?", return_tensors="pt")
    with pytest.raises(ValueError, match=f"the text holds {3 * N_Q - 1} video tokens .* the videos give {3 * N_Q}"):
        plain(**{**inputs, "input_ids": inputs["input_ids"][:, 1:], "attention_mask": inputs["attention_mask"][:, 1:]})
    with pytest.raises(ValueError, match="Prompts without <video> take one clip each: got 2 prompts and 1 clips"):
        processor(videos=[clip(3)], text=PROMPTS, return_tensors="pt")


@pytest.mark.parametrize("field,value", [("video_bridge", "pooled"), ("max_num_frames", 0),
                                         ("num_video_query_tokens", -1), ("video_qformer_num_hidden_layers", 1.5)])
def test_invalid_video_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        FusionBlip2Config(**{field: value})
