"""The vision side of every family: build or load any transformers vision model and select its features.

Contract: `select_image_features(tower, pixel_values, ...)` returns `(N, P, D_v)` — one row of patch features per
image, taken from one hidden layer of the tower.

Legend: N images, C channels, H x W pixels, P visual tokens per image, D_v vision width.
"""

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    Blip2VisionModel,
    InstructBlipVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from .configuration_base import _vision_half

# Vision models that AutoModel does not map from their config (BLIP-2's and InstructBLIP's EVA ViT-g).
EXTRA_VISION_MODELS: dict[str, type[PreTrainedModel]] = {
    "blip_2_vision_model": Blip2VisionModel,
    "instructblip_vision_model": InstructBlipVisionModel,
}

# Tokens a tower emits before its patch tokens: CLS (+ registers) for ViT-like towers, none for SigLIP.
NO_PREFIX_TOKEN_TYPES = {"siglip_vision_model", "siglip2_vision_model"}


def vision_model_class(config: PreTrainedConfig) -> type[PreTrainedModel]:
    if config.model_type in EXTRA_VISION_MODELS:
        return EXTRA_VISION_MODELS[config.model_type]
    try:
        return AutoModel._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"No vision model is known for config type {type(config).__name__} ({config.model_type!r}).")


def build_vision_tower(config: PreTrainedConfig) -> PreTrainedModel:
    """A randomly initialised vision tower for `config` (the vision half of a composite config)."""
    config = _vision_half(config)
    return vision_model_class(config)._from_config(config)


def load_vision_tower(name_or_path: str, **kwargs) -> PreTrainedModel:
    """Load a pretrained vision tower; a CLIP / SigLIP / BLIP-2 checkpoint contributes its vision model only."""
    config = _vision_half(AutoConfig.from_pretrained(name_or_path))
    tower, info = vision_model_class(config).from_pretrained(
        name_or_path, config=config, output_loading_info=True, **kwargs
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{name_or_path} does not hold a complete {type(tower).__name__}: missing {sorted(info['missing_keys'])}, "
            f"mismatched {sorted(info['mismatched_keys'])}."
        )
    return tower


def num_prefix_tokens(config: PreTrainedConfig) -> int:
    """How many non-patch tokens (CLS, registers) the tower puts before its patch tokens."""
    if config.model_type in NO_PREFIX_TOKEN_TYPES:
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def num_patches(config: PreTrainedConfig, height: int, width: int) -> int:
    patch = config.patch_size
    return (height // patch) * (width // patch)


def num_visual_tokens(config: PreTrainedConfig, height: int, width: int, strategy: str) -> int:
    """Feature tokens per image that `select_image_features` returns for an `height` x `width` input."""
    extra = num_prefix_tokens(config) if strategy == "full" else 0
    return num_patches(config, height, width) + extra


def select_image_features(
    tower: nn.Module, pixel_values: torch.Tensor, *, layer: int, strategy: str, **kwargs
) -> tuple[torch.Tensor, ModelOutput]:
    """
    Run `tower` and return the features of one hidden layer, with the tower's own outputs.

    Args:
        pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`).
        layer (`int`): index into the tower's `hidden_states` (0 = embeddings).
        strategy (`str`): `"default"` keeps the patch tokens only, `"full"` keeps every token.
        kwargs: passed to the tower (`output_attentions`, attention kwargs).

    Returns:
        `torch.Tensor` of shape `(num_images, num_tokens, vision_hidden_size)`, and the tower's output (its
        `hidden_states` always filled).
    """
    N, C, H, W = pixel_values.shape
    kwargs["output_hidden_states"] = True
    outputs = tower(pixel_values.to(tower.dtype), return_dict=True, **kwargs)
    features = outputs.hidden_states[layer]  # (N, prefix + P, D_v)
    if strategy == "default":
        P = num_patches(tower.config, H, W)
        features = features[:, features.shape[1] - P :]  # (N, P, D_v)
    return features, outputs
