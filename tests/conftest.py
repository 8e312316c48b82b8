import copy
import importlib.util
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network (the local-Hub test sets 0)
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest-xdist's workers (the default run has one per core, up to 4):
    # one thread each, for its subprocesses too, so that the workers share the cores instead of fighting for them
    os.environ.setdefault("OMP_NUM_THREADS", "1")
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


# ---- comparing float32 results that differ only in the order of their sums ----------------------------------------
# Two implementations of the same math (ours and a reference, SDPA and eager attention, a batch and its rows alone, two
# processes, another CPU's BLAS blocking) add the same float32 terms in other orders. Reordering a sum of n terms moves
# it by at most (n - 1) eps times the sum of the terms' magnitudes (Higham, "Accuracy and Stability of Numerical
# Algorithms", section 4.2). The sums of the tiny models here run over at most about 10^3 terms (a hidden width, a
# sequence, a batch's tokens) of layer-normalised, unit-scale activations, so a result is compared to 2^10 eps
# (1.2e-4) of its own scale, or of 1 where it is smaller than the unit-scale terms summed into it. A wrong result (a
# missing or transposed weight, a shifted position, a wrong mask, a sample counted twice) is off by a fraction of its
# scale of order 1 on random tiny models, thousands of times more. No bound here comes from a figure a run printed.
FLOAT32_REORDER = 2 ** 10 * torch.finfo(torch.float32).eps


def reorder_bound(reference: torch.Tensor) -> float:
    """The largest difference float32 summation order explains for results of `reference`'s scale (see above)."""
    return FLOAT32_REORDER * max(1.0, reference.detach().abs().max().item())


def assert_reordered(actual: torch.Tensor, expected: torch.Tensor):
    """`actual` equals `expected` up to float32 summation order (see FLOAT32_REORDER)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=reorder_bound(expected))


def assert_same_logits(name, ours, reference, inputs, reference_inputs=None) -> float:
    """Our logits against the reference's on the same batch (or on the reference processor's encoding of it), at the
    positions `attention_mask` keeps; prints the largest difference and fails above what float32 summation order
    explains (reorder_bound)."""
    with torch.no_grad():
        ours_logits = ours(**inputs).logits
        reference_logits = reference(**(inputs if reference_inputs is None else reference_inputs)).logits
    kept = inputs["attention_mask"].bool()
    diff = (ours_logits - reference_logits)[kept].abs().max().item()
    bound = reorder_bound(reference_logits[kept])
    print(f"{name}: max |dlogit| = {diff:.2e} (bound {bound:.1e})")
    assert diff <= bound
    return diff


def slow_except(keep, values) -> list:
    """`values` as parameters, all but `keep` marked slow: the default run takes one variant, `-m slow` the others."""
    return [value if value == keep else pytest.param(value, marks=pytest.mark.slow) for value in values]


def dynamic_static_and_compiled(model, inputs, max_new_tokens: int):
    """Greedy tokens of `model` on `inputs` with the dynamic cache, the static cache, and the static cache with a
    compiled forward (fullgraph, as `_can_compile_fullgraph` promises; on the CPU too)."""
    from transformers import CompileConfig

    dynamic = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static")
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    torch._dynamo.reset()
    compiled = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, cache_implementation="static",
                              compile_config=compile_config)
    return dynamic, static, compiled


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def save_tiny_idefics(path, *, heads: int = 4, shake_norms: bool = True):
    """A tiny transformers IdeficsForVisionText2Text (vector gates opened, blocks before layers 0 and 2, two decoupled
    extra tokens; `heads` LM attention heads over its 64-wide hidden state), saved with its IdeficsProcessor to
    `path`."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    from vlm_fusion.tools.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<end_of_utterance>"]})
    config = IdeficsConfig(
        vocab_size=len(tokenizer) - 2, additional_vocab_size=2, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=heads, cross_layer_interval=2, alpha_type="vector",
        use_resampler=True,
        vision_config=dict(embed_dim=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=16),
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():  # open the gates (IDEFICS starts them at 0), maybe shake the norms
        for name, param in model.named_parameters():
            if "alpha" in name:
                param.copy_(torch.randn_like(param))
            elif shake_norms and "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path)
    IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=32), tokenizer=tokenizer,
                     image_size=32).save_pretrained(path)
    return path
