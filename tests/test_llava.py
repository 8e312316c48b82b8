"""Behaviour of the LLaVA-style family that users rely on, across vision tower x LM pairs."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from conftest import assert_reordered, random_image
from vlm_fusion import FusionLlavaConfig, FusionLlavaForConditionalGeneration, FusionLlavaModel
from vlm_fusion.compat import is_activation_checkpointing
from vlm_fusion.tools.tiny import tiny_model_and_processor, tiny_text_config, tiny_vision_config

PAIRS = [("clip", "llama"), ("siglip", "gpt2"), ("dinov2", "qwen2"), ("vit", "opt"), ("clip", "mistral")]
PROMPTS = ["USER: <image>\nwhat is shown ? ASSISTANT:", "USER: <image> <image>\nwhich image has a red circle ? ASSISTANT:"]


def build(vision="clip", text="llama", **kwargs):
    return tiny_model_and_processor("fusion_llava", vision, text, **kwargs)


def batch(processor, prompts=PROMPTS, seed=0):
    processor.tokenizer.padding_side = "left"
    n_images = sum(p.count("<image>") for p in prompts)
    images = [random_image(seed + i) for i in range(n_images)]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("projector_type", "mlp3x"), ("vision_feature_select_strategy", "cls"), ("vision_feature_layer", 7),
     ("vision_feature_layer", "last"), ("image_token_id", -1), ("projector_bias", "yes")],
)
def test_invalid_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FusionLlavaConfig(vision_config=tiny_vision_config("clip"), text_config=tiny_text_config("llama"), **{field: value})


def test_config_defaults_and_composite_vision_config():
    config = FusionLlavaConfig()
    assert (config.vision_config.model_type, config.text_config.model_type) == ("clip_vision_model", "llama")
    assert config.projector_type == "mlp2x_gelu" and config.vision_feature_layer == -2
    full_clip = {"model_type": "clip", "vision_config": tiny_vision_config("clip")}
    assert FusionLlavaConfig(vision_config=full_clip).vision_config.model_type == "clip_vision_model"
    reloaded = AutoConfig.for_model(**FusionLlavaConfig(projector_type="linear").to_dict())
    assert isinstance(reloaded, FusionLlavaConfig) and reloaded.projector_type == "linear"


# ---- save / load ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision, text", PAIRS)
def test_save_load_round_trip_is_exact(vision, text, tmp_path):
    model, processor = build(vision, text)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is FusionLlavaForConditionalGeneration
    assert type(AutoModel.from_pretrained(tmp_path)) is FusionLlavaModel
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    inputs = batch(AutoProcessor.from_pretrained(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    if text == "gpt2":  # tied input/output embeddings survive the round trip
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("vision, text", PAIRS)
def test_cached_and_uncached_greedy_generation_agree(vision, text):
    model, processor = build(vision, text)
    inputs = batch(processor)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_images_are_encoded_once_during_cached_generation():
    model, processor = build()
    calls = []
    model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    model.generate(**batch(processor), max_new_tokens=5, do_sample=False)
    assert len(calls) == 1


# ---- batching, several images, padding -------------------------------------------------------------------------
def test_left_padded_batch_matches_each_sample_alone():
    model, processor = build("siglip", "gpt2")
    inputs = batch(processor)
    with torch.no_grad():
        batched = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    first_image = 0
    for i, prompt in enumerate(PROMPTS):
        n = prompt.count("<image>")
        alone = batch(processor, [prompt], seed=first_image)
        first_image += n
        assert torch.equal(alone["pixel_values"], inputs["pixel_values"][first_image - n : first_image])
        with torch.no_grad():
            single = model(**alone).logits[0]
        valid = inputs["attention_mask"][i].bool()
        assert_reordered(batched[i][valid], single)
        single_generated = model.generate(**alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[i, -5:], single_generated[0, -5:])


def test_beam_search_keeps_each_samples_images_together():
    model, processor = build()
    inputs = batch(processor)
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    first_image = 0
    for i, prompt in enumerate(PROMPTS):
        n = prompt.count("<image>")
        alone = batch(processor, [prompt], seed=first_image)
        first_image += n
        assert torch.equal(beams[i, -4:], model.generate(**alone, max_new_tokens=4, num_beams=3, do_sample=False)[0, -4:])


def test_sampling_runs_and_is_reproducible_with_a_seed():
    model, processor = build()
    inputs = batch(processor)
    torch.manual_seed(1)
    first = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20)
    torch.manual_seed(1)
    assert torch.equal(first, model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=20))
    assert first.shape == (2, inputs["input_ids"].shape[1] + 5)


# ---- errors ------------------------------------------------------------------------------------------------------
def test_mismatched_image_token_count_raises_with_both_counts():
    model, processor = build()
    inputs = batch(processor, [PROMPTS[0]])
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == processor.image_token_id).nonzero()[0]] = 5  # drop one placeholder
    with pytest.raises(ValueError, match=r"15 image tokens.*16 features"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"16 image tokens.*32 features"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))


def test_processor_rejects_image_count_mismatch_and_truncation():
    _, processor = build()
    with pytest.raises(ValueError, match="2 <image> tokens and 1 images"):
        processor(images=[random_image(0)], text=[PROMPTS[1]])
    with pytest.raises(ValueError, match="truncation"):
        processor(images=[random_image(0)], text=[PROMPTS[0]], truncation=True, max_length=8)


# ---- training --------------------------------------------------------------------------------------------------
def test_labels_at_image_positions_are_ignored():
    model, processor = build()
    inputs = batch(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    # Reference: next-token cross-entropy with image positions and padding excluded.
    targets = labels.masked_fill(labels == processor.image_token_id, -100)[:, 1:]
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, processor = build()
    inputs = batch(processor)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def grads():
        model.zero_grad()
        model(**inputs, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads()
    model.gradient_checkpointing_enable()
    assert is_activation_checkpointing(model.language_model)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and any("multi_modal_projector" in k for k in plain)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


@pytest.mark.parametrize("text", ["llama", "gpt2"])
def test_resize_token_embeddings(text, tmp_path):
    model, processor = build(text=text)
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(old.shape[0] + 8)
    assert model.config.text_config.vocab_size == old.shape[0] + 8
    assert torch.equal(model.get_input_embeddings().weight[: old.shape[0]], old)
    assert model.get_output_embeddings().weight.shape[0] == old.shape[0] + 8
    logits = model(**batch(processor)).logits
    assert logits.shape[-1] == old.shape[0] + 8
    model.save_pretrained(tmp_path)
    assert AutoModelForImageTextToText.from_pretrained(tmp_path).config.text_config.vocab_size == old.shape[0] + 8


# ---- anyres (LLaVA-NeXT tiling) with any tower and any LM ---------------------------------------------------------
@pytest.mark.parametrize("vision, text", [("siglip", "gpt2"), ("dinov2", "qwen2")])
def test_anyres_tiling_with_any_tower_and_lm(vision, text, tmp_path):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlm_fusion import FusionLlavaProcessor
    from vlm_fusion.tools.tiny import tiny_tokenizer

    grids = [[32, 64], [64, 32], [64, 64]]
    tokenizer = tiny_tokenizer()
    config = FusionLlavaConfig(vision_config=tiny_vision_config(vision), text_config=tiny_text_config(text, vocab_size=58),
                               image_token_id=58, image_grid_pinpoints=grids)
    model = FusionLlavaForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=grids)
    processor = FusionLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8)
    processor.tokenizer.padding_side = "left"
    sizes = [(40, 80), (70, 30)]
    images = [random_image(i, size=s) for i, s in enumerate(sizes)]
    inputs = processor(images=images, text=[PROMPTS[0], PROMPTS[0]], padding=True, return_tensors="pt")
    counts = (inputs["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert counts == [config.num_image_tokens(*s) for s in sizes] and counts[0] != counts[1]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.model.image_newline, model.model.image_newline)
    reloaded_inputs = AutoProcessor.from_pretrained(tmp_path)(images=images, text=[PROMPTS[0]] * 2, padding=True,
                                                              return_tensors="pt")
    assert torch.equal(reloaded_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        batched = loaded(**inputs).logits
        for i in range(2):  # each sample alone gives its logits in the batch
            alone = processor(images=[images[i]], text=[PROMPTS[0]], return_tensors="pt")
            valid = inputs["attention_mask"][i].bool()
            assert_reordered(batched[i][valid], loaded(**alone).logits[0])
    cached = loaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, loaded.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False))
    beams = loaded.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert beams.shape[0] == 2


def test_anyres_beam_search_keeps_images_of_different_sizes_with_their_sample():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlm_fusion import FusionLlavaProcessor
    from vlm_fusion.tools.tiny import tiny_tokenizer

    grids = [[32, 64], [64, 32], [64, 64]]
    config = FusionLlavaConfig(vision_config=tiny_vision_config("clip"), text_config=tiny_text_config("llama", vocab_size=58),
                               image_token_id=58, image_grid_pinpoints=grids)
    model = FusionLlavaForConditionalGeneration(config).eval()
    processor = FusionLlavaProcessor(image_processor=LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=grids),
        tokenizer=tiny_tokenizer(), patch_size=8)
    processor.tokenizer.padding_side = "left"
    prompts = ["USER: <image> <image>\nwhich is red ? ASSISTANT:", PROMPTS[0]]
    images = [random_image(0, size=(40, 80)), random_image(1, size=(70, 30)), random_image(2, size=(50, 50))]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    for i, (prompt, own) in enumerate(zip(prompts, (images[:2], images[2:]))):
        alone = processor(images=own, text=[prompt], return_tensors="pt")
        assert torch.equal(beams[i, -3:], model.generate(**alone, max_new_tokens=3, num_beams=2, do_sample=False)[0, -3:])


def test_a_batch_with_bos_written_in_some_texts_only_is_refused():
    """The chat template writes BOS where the tokenizer adds one, and the processor then adds none; a batch that mixes
    both kinds of text would get one of them wrong, so it is refused in one line."""
    from vlm_fusion import FusionLlavaProcessor
    from vlm_fusion.tools.tiny import tiny_bpe_tokenizer, tiny_image_processor

    processor = FusionLlavaProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_bpe_tokenizer())
    bos = processor.tokenizer.bos_token
    written = processor(text=[f"{bos}USER: hi"], return_tensors="pt")["input_ids"][0].tolist()
    added = processor(text=["USER: hi"], return_tensors="pt")["input_ids"][0].tolist()
    assert written == added and written.count(processor.tokenizer.bos_token_id) == 1
    with pytest.raises(ValueError, match="some of the texts start with"):
        processor(text=[f"{bos}USER: hi", "USER: hi"], padding=True)
