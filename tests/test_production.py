"""Production loading for every family: accelerate device maps with disk offload, bitsandbytes 4-bit, dtypes."""

import logging

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from conftest import random_image
from vlm_fusion.tools.tiny import tiny_model_and_processor

FAMILIES = {
    "fusion_llava": {},
    "fusion_blip2": dict(num_query_tokens=8, qformer_hidden_size=64, qformer_num_hidden_layers=2,
                         qformer_num_attention_heads=4, qformer_intermediate_size=128),
    "fusion_flamingo": dict(num_latents=4, perceiver_depth=2, perceiver_heads=2, perceiver_head_dim=32,
                            cross_attention_heads=2, cross_attention_head_dim=32),
}
PROMPT = "<image> what is shown ?"


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request, tmp_path_factory):
    """A tiny model of each family (CLIP + Llama, widths that 4-bit CPU kernels take), saved, with inputs."""
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor(request.param, "clip", "llama", **FAMILIES[request.param])
    if request.param == "fusion_flamingo":
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(0.4)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    inputs = processor(images=[random_image(0)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return request.param, path, model, inputs, logits, tokens


def test_cpu_and_disk_offload_give_the_same_logits_and_tokens(saved, tmp_path):
    family, path, model, inputs, logits, tokens = saved
    budget = int(0.5 * model.get_memory_footprint())
    offloaded = AutoModelForImageTextToText.from_pretrained(
        path, device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path)
    )
    placement = offloaded.hf_device_map
    print(family, "device map:", placement)
    assert set(placement.values()) == {"cpu", "disk"}
    # Nothing that must stay whole is split: no key reaches inside a decoder layer, vision layer or bridge layer.
    assert not any(".gated_cross_attn_layer" in k or ".self_attn" in k or ".mlp" in k for k in placement)
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, logits)
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=5, do_sample=False), tokens)


def test_explicit_device_map_with_the_language_model_on_disk(saved, tmp_path):
    family, path, model, inputs, logits, tokens = saved
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children()}
    device_map.update({"model.language_model": "disk", "lm_head": "cpu"})
    offloaded = AutoModelForImageTextToText.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path))
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, logits)
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=5, do_sample=False), tokens)


def linear_names(model, cls):
    return {name for name, module in model.named_modules() if type(module) is cls}


def expected_quantized(model):
    """The LM's linear layers, less (Flamingo) the gated blocks: what 4-bit loading should convert (not lm_head)."""
    return {f"model.language_model.{name}" for name, module in model.language_model.named_modules()
            if type(module) is torch.nn.Linear and "gated_cross_attn" not in name}


@pytest.mark.parametrize("user_skips", [None, ["model.language_model.layers.0.mlp"]])
def test_4bit_quantizes_exactly_the_language_models_linear_layers(saved, user_skips, tmp_path, caplog):
    family, path, model, inputs, logits, tokens = saved
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=user_skips)
    with caplog.at_level(logging.WARNING):
        quantized = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config)
    assert config.llm_int8_skip_modules == user_skips  # the caller's config is not mutated
    expected = expected_quantized(model) - {n for n in expected_quantized(model) if user_skips and n.startswith(user_skips[0])}
    assert linear_names(quantized, bnb.nn.Linear4bit) == expected
    unquantized = linear_names(quantized, torch.nn.Linear)
    assert unquantized == linear_names(model, torch.nn.Linear) - expected
    assert "lm_head" in unquantized and any(n.startswith("model.vision_tower.") for n in unquantized)
    if user_skips:
        assert "keeps" in caplog.text and "vision_tower" in caplog.text
    footprint, full = quantized.get_memory_footprint(), model.get_memory_footprint()
    print(f"{family}: 4-bit footprint {footprint:,} B vs fp32 {full:,} B; unquantized: "
          f"{sorted({'.'.join(n.split('.')[:2]) for n in unquantized})}")
    assert footprint < full
    out = quantized.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == tokens.shape
    quantized.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert linear_names(reloaded, bnb.nn.Linear4bit) == linear_names(quantized, bnb.nn.Linear4bit)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=5, do_sample=False), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "auto"])
def test_dtype_loading_runs(saved, dtype):
    family, path, model, inputs, logits, tokens = saved
    loaded = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    expected = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert loaded.language_model.dtype == expected
    if family == "fusion_blip2":  # declared fp32-only, as transformers keeps BLIP-2's Q-Former
        assert loaded.model.qformer.query_tokens.dtype == torch.float32
    with torch.no_grad():
        low = loaded(**inputs).logits.float()
    assert low.shape == logits.shape and torch.isfinite(low).all()
    assert (low - logits).abs().max() < 0.25  # bf16 rounding, not a different model
    loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
