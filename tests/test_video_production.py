"""A clip through what a model meets in production, as an image goes through it (test_production, test_publishing,
test_transformers_layout): static cache and compiled decoding, a device map with disk offload, bitsandbytes 4-bit, and
the remote-code export loaded where vlm-fusion is not installed."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from conftest import assert_reordered, changed_weights, dynamic_static_and_compiled, slow_except
from vlm_fusion.tools.tiny import tiny_model_and_processor

# Each family's video path, at widths bitsandbytes' CPU kernels take (tools/tiny.py).
VIDEO = {
    "fusion_llava": dict(video_pooling="average", video_pool_stride=2),
    "fusion_blip2": dict(video_bridge="per_frame"),
    "fusion_flamingo": dict(num_latents=4, perceiver_depth=2, perceiver_heads=2, perceiver_head_dim=32,
                            cross_attention_heads=2, cross_attention_head_dim=32),
}
PROMPTS = ["<video> what happens ?", "<video> where does the square go ?"]
FRAMES = 4


def clip(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (FRAMES, 40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=list(VIDEO))
def saved(request, tmp_path_factory):
    """A tiny video model of each family, saved, with a left-padded batch of two clips and its fp32 logits/tokens."""
    family = request.param
    model, processor, inputs = build(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return family, path, model, processor, inputs, logits, tokens


def test_the_clip_reaches_the_logits(saved):
    """The comparisons below are not between clip-blind models."""
    family, _, model, _, inputs, logits, _ = saved
    other = {**inputs, "pixel_values_videos": torch.randn_like(inputs["pixel_values_videos"])}
    with torch.no_grad():
        assert (model(**other).logits - logits).abs().max() > 1e-3


def build(family):
    """The tiny video model of `family` (Flamingo's gates opened) and its processor, with a left-padded batch of two
    clips."""
    torch.manual_seed(0)
    model, processor = tiny_model_and_processor(family, video=True, num_frames=FRAMES, **VIDEO[family])
    if family == "fusion_flamingo":  # opened gates: the clips reach the logits
        with torch.no_grad():
            for block in model.gated_cross_attn_layers.values():
                block.attn_gate.fill_(0.7)
                block.ff_gate.fill_(0.4)
    processor.tokenizer.padding_side = "left"
    return model, processor, processor(videos=[clip(0), clip(1)], text=PROMPTS, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", slow_except("fusion_llava", VIDEO))
def test_static_cache_and_compiled_decoding_give_the_dynamic_caches_tokens(family):
    model, _, inputs = build(family)
    dynamic, static, compiled = dynamic_static_and_compiled(model, inputs, max_new_tokens=5)
    assert torch.equal(static, dynamic) and torch.equal(compiled, dynamic)


def test_cpu_and_disk_offload_give_the_same_logits_and_tokens(saved, tmp_path):
    family, path, model, _, inputs, logits, tokens = saved
    budget = sum(p.numel() * p.element_size() for p in model.parameters()) // 3
    offloaded = AutoModelForImageTextToText.from_pretrained(path, device_map="auto", max_memory={"cpu": budget},
                                                            offload_folder=str(tmp_path)).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    with torch.no_grad():
        assert_reordered(offloaded(**inputs).logits, logits)
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=5, do_sample=False), tokens)


def test_4bit_reads_a_clip_with_the_tower_and_bridge_in_full_precision(saved):
    import bitsandbytes as bnb

    family, path, model, _, inputs, _, tokens = saved
    quantized = AutoModelForImageTextToText.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)).eval()
    four_bit = {name for name, module in quantized.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert four_bit and all(".language_model." in f".{name}" and "gated_cross_attn" not in name for name in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.model.vision_tower.modules())
    with torch.no_grad():
        logits = quantized(**inputs).logits
    out = quantized.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.isfinite(logits).all() and out.shape == tokens.shape
    assert quantized.get_memory_footprint() < model.get_memory_footprint()


REMOTE = textwrap.dedent("""
    import sys, torch, numpy as np
    sys.modules["vlm_fusion"] = None  # the package cannot be imported here
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path, inputs_file, clips_file = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    saved = torch.load(inputs_file)
    clips = list(np.load(clips_file))
    inputs = processor(videos=clips, text=saved.pop("prompts"), padding=True, return_tensors="pt")
    assert inputs.keys() == saved.keys(), (sorted(inputs), sorted(saved))
    assert all(torch.equal(inputs[k], saved[k]) for k in saved), [k for k in saved if not torch.equal(inputs[k], saved[k])]
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print(type(model).__module__, type(processor).__module__, type(processor.video_processor).__module__)
    torch.save({"logits": logits, "tokens": tokens, "state": model.state_dict()}, inputs_file + ".out")
""")


@pytest.mark.parametrize("family", slow_except("fusion_llava", VIDEO))
def test_remote_code_export_reads_a_clip_without_the_package(family, tmp_path):
    model, processor, inputs = build(family)
    model.save_pretrained(tmp_path / "model", remote_code=True)
    processor.save_pretrained(tmp_path / "model", remote_code=True)
    assert "auto_map" in json.loads((tmp_path / "model" / "config.json").read_text())
    with torch.no_grad():
        expected = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.save({**inputs, "prompts": PROMPTS}, tmp_path / "inputs.pt")
    np.save(tmp_path / "clips.npy", np.stack([clip(0), clip(1)]))
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "model"), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "clips.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("transformers_modules") == 3, run.stdout  # model, processor and video processor
    out = torch.load(tmp_path / "inputs.pt.out")
    assert not changed_weights(model, out["state"])
    assert_reordered(out["logits"], expected)  # another process: the same math, maybe another summation order
    assert torch.equal(out["tokens"], tokens)
