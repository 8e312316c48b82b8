import copy
import importlib.util
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (the local-Hub test sets 0)

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_fusion  # noqa: F401  (registers the families)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import `conversion_scripts/<name>.py` as a module (scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "conversion_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def causal_lm_state_dict(model) -> dict:
    """The plain causal LM inside a vlm-fusion model (base decoder + head), keyed as its `*ForCausalLM` keys them;
    Flamingo's gated blocks left out."""
    from vlm_fusion.language_model import causal_lm_class

    prefix = causal_lm_class(model.config.text_config).base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in model.language_model.state_dict().items() if "gated_cross_attn" not in k}
    return {**state, "lm_head.weight": model.lm_head.weight}


def causal_lm_of(model):
    """A pristine `*ForCausalLM` (no blocks, no hooks) with the weights of the LM inside `model`."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_config(copy.deepcopy(model.config.text_config)).eval()
    lm.load_state_dict(causal_lm_state_dict(model))
    return lm


def assert_same_logits(name, ours, reference, inputs, reference_inputs=None, atol=1e-4) -> float:
    """Our logits against the reference's on the same batch (or on the reference processor's encoding of it), at the
    positions `attention_mask` keeps; prints the largest difference and fails above `atol`."""
    with torch.no_grad():
        ours_logits = ours(**inputs).logits
        reference_logits = reference(**(inputs if reference_inputs is None else reference_inputs)).logits
    diff = (ours_logits - reference_logits)[inputs["attention_mask"].bool()].abs().max().item()
    print(f"{name}: max |dlogit| = {diff:.2e}")
    assert diff <= atol
    return diff


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



COLOURS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}


def make_training_parts(root, text: str = "llama", samples: int = 16):
    """Pretrained parts and data as a user of `vlm-fusion train` has them: a tiny CLIP tower with its image
    processor, a tiny causal LM with a byte-level BPE tokenizer (BOS added, as Llama's), an image folder and two
    LLaVA-format files: image-caption pairs (`captions.json`) and multi-turn conversations (`conversations.json`:
    one, two or no images per sample)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    from vlm_fusion.tools.tiny import tiny_bpe_tokenizer, tiny_image_processor, tiny_text_config, tiny_vision_config

    root = pathlib.Path(root)
    torch.manual_seed(0)
    CLIPVisionModel(AutoConfig.for_model(**tiny_vision_config("clip"))).save_pretrained(root / "vision")
    tiny_image_processor().save_pretrained(root / "vision")
    tokenizer = tiny_bpe_tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config(text, vocab_size=len(tokenizer))))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    (root / "images").mkdir()
    names = list(COLOURS)
    for i in range(samples):
        Image.new("RGB", (32, 32), COLOURS[names[i % 4]]).save(root / "images" / f"{i}.png")
    captions = [{"id": f"cap{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": f"a {names[i % 4]} square"}]}
        for i in range(samples)]
    conversations = []
    for i in range(samples):
        colour, other = names[i % 4], names[(i + 1) % 4]
        if i % 4 == 3:  # text only
            conversations.append({"id": f"txt{i}", "conversations": [
                {"from": "human", "value": "what colour is the sky ?"}, {"from": "gpt", "value": "blue"}]})
        elif i % 4 == 2:  # two images
            conversations.append({"id": f"two{i}", "image": [f"{i}.png", f"{(i + 1) % samples}.png"],
                                  "conversations": [
                {"from": "human", "value": "<image>\n<image>\nwhat colours are these ?"},
                {"from": "gpt", "value": f"{colour} and {other}"}]})
        else:
            conversations.append({"id": f"conv{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": colour},
                {"from": "human", "value": "is it a square ?"}, {"from": "gpt", "value": "yes"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "conversations.json").write_text(json.dumps(conversations))
    return root
