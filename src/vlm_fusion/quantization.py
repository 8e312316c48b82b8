"""bitsandbytes 4-bit/8-bit loading: what stays in full precision, and saving a 4-bit model as it was loaded.

Under 4-bit, a vlm-fusion model quantizes its language model's linear layers only; the vision tower, the bridge and
`lm_head` (each family's `_unquantized_modules`) stay in full precision, even when the user passes a skip list.
"""

import copy

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def with_unquantized_modules(quantization_config, unquantized: list[str]):
    """A copy of `quantization_config` whose skip list also holds `unquantized` (regexes of module names)."""
    config = copy.deepcopy(quantization_config)
    if not hasattr(config, "llm_int8_skip_modules"):
        return config
    user = list(config.llm_int8_skip_modules or [])
    added = [m for m in unquantized if m not in user]
    if user and added:
        logger.warning(
            "vlm-fusion keeps %s unquantized in addition to your `llm_int8_skip_modules` %s (transformers would "
            "otherwise drop its own lm_head exemption and quantize the vision tower and the bridge).", added, user
        )
    config.llm_int8_skip_modules = user + added
    return config


def remember_4bit_absmax(model: torch.nn.Module) -> None:
    """Keep each 4-bit weight's absmax as loaded (see `restore_portable_4bit_layout`)."""
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None and not getattr(quant_state, "packing_format_for_cpu", False):
            module._loaded_absmax = quant_state.absmax.clone()


def restore_portable_4bit_layout(model: torch.nn.Module) -> None:
    """
    bitsandbytes (0.50) repacks a 4-bit weight in place for its CPU kernels on the first forward, rounding its
    absmax to bf16, and transformers' `save_pretrained` writes the weight as it finds it: a model saved after
    inference reloaded as another model. Undo the packing and put back the absmax it was loaded with, so the
    saved checkpoint is the loaded quantization; the next forward packs again.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            if hasattr(module, "_loaded_absmax"):
                weight.quant_state.absmax = module._loaded_absmax.clone()
