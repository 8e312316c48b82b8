import copy
import importlib.util
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (the local-Hub test sets 0)
if "VLM_FUSION_DATA_CACHE" not in os.environ:  # `vlm-fusion train`'s data cache: this run's own, not ~/.cache
    import tempfile

    os.environ["VLM_FUSION_DATA_CACHE"] = tempfile.mkdtemp(prefix="vlm-fusion-data-cache-")

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_fusion  # noqa: F401  (registers the families)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def changed_weights(model, state) -> list:
    """The names of `model`'s weights that are not bit-identical in `state` (another copy's state dict)."""
    return [key for key, value in model.state_dict().items() if not torch.equal(state[key], value)]


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



