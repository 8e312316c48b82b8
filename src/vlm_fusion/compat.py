"""What vlm-fusion needs from transformers that not every release it supports (5.19 on) has.

Between 5.19 and 5.24 transformers renamed the KV cache `past_key_values` -> `cache`, in `forward` arguments and in
model outputs alike; came to build a composite config's sub-configs itself from `sub_configs_defaults`
(`SubConfigSpec`); added the multimodal output classes and `slice_logits_to_keep`; and renamed
`is_gradient_checkpointing` -> `is_activation_checkpointing`. Each is detected from transformers itself, never from its
version string: where transformers has it, the name below is transformers' own object.
"""

import functools
import inspect
from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

# The name transformers gives the KV cache in `forward` arguments and model outputs: `cache` (5.24), `past_key_values`.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


# ---- the KV cache's name -------------------------------------------------------------------------------------------
_cache_arguments: dict[type, str] = {}  # LM class -> its `forward`'s name for the cache (a dict, which compile traces)


def cache_kwargs(language_model: torch.nn.Module, cache) -> dict:
    """`{name: cache}` under the name the language model's `forward` takes its KV cache by (an LM handed `cache=`
    that only knows `past_key_values` would take it into `**kwargs` and silently start a new cache)."""
    lm_class = type(language_model)
    if lm_class not in _cache_arguments:
        parameters = inspect.signature(lm_class.forward).parameters
        _cache_arguments[lm_class] = next((n for n in ("cache", "past_key_values") if n in parameters), CACHE_NAME)
    return {_cache_arguments[lm_class]: cache}


if CACHE_NAME == "cache":
    takes_cache_as_past_key_values = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
else:

    def takes_cache_as_past_key_values(forward):
        """For a `forward(..., cache=...)`: transformers 5.19 (`generate` too) passes the cache as `past_key_values`,
        its own name there, so this takes it as `cache`, without a deprecation warning."""

        @functools.wraps(forward)
        def wrapper(*args, **kwargs):
            if "past_key_values" in kwargs and kwargs.get("cache") is None:
                kwargs["cache"] = kwargs.pop("past_key_values")
            return forward(*args, **kwargs)

        return wrapper


def is_activation_checkpointing(model) -> bool:
    """`model.is_activation_checkpointing` (transformers 5.24), or `model.is_gradient_checkpointing` (5.19)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


# ---- composite configs ---------------------------------------------------------------------------------------------
try:
    from transformers.configuration_utils import SubConfigSpec

    TRANSFORMERS_BUILDS_SUB_CONFIGS = True
except ImportError:  # transformers 5.19: a composite config lists `sub_configs` and builds them in `__post_init__`
    TRANSFORMERS_BUILDS_SUB_CONFIGS = False

    class SubConfigSpec:
        """What vlm-fusion uses of transformers 5.24's `SubConfigSpec`: a sub-config built by `config_class`, or for
        `AutoConfig` by the class of its `model_type` (default: `model_type`), from a dict, or from `init_kwargs`."""

        def __init__(self, config_class, model_type: str | None = None, init_kwargs: dict | None = None,
                     optional: bool = False):
            self.config_class, self.optional = config_class, optional
            self.model_type = model_type if model_type is not None else config_class.model_type
            self.init_kwargs = init_kwargs if init_kwargs is not None else {}

        def create_subconfig(self, key, subconfig=None, **kwargs):
            from transformers import AutoConfig, PreTrainedConfig
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if isinstance(subconfig, PreTrainedConfig):
                return subconfig, kwargs
            if subconfig is None:
                subconfig = self.init_kwargs
            if not isinstance(subconfig, dict):
                raise TypeError(f"`{key}` must be a `dict`, `PreTrainedConfig`, or `None`, got `{type(subconfig)}`")
            if self.config_class is AutoConfig:
                return CONFIG_MAPPING[subconfig.get("model_type", self.model_type)](**subconfig), kwargs
            return self.config_class(**subconfig), kwargs


def build_sub_configs(config, kwargs: dict) -> dict:
    """Build `config`'s sub-configs from its `sub_configs_defaults` where transformers does not (5.19); call it in
    `__post_init__` before `super().__post_init__(**kwargs)`, with the kwargs it returns."""
    if not TRANSFORMERS_BUILDS_SUB_CONFIGS:
        for key, spec in type(config).sub_configs_defaults.items():
            if getattr(config, key) is not None or not spec.optional:
                subconfig, kwargs = spec.create_subconfig(key, getattr(config, key), **kwargs)
                setattr(config, key, subconfig)
    return kwargs


# ---- outputs and logits --------------------------------------------------------------------------------------------
try:
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast, MultimodalCausalLMOutputWithPast
except ImportError:  # transformers 5.19: the same fields, the cache under its name there (`generate` reads it)

    class _MultimodalModelOutput(ModelOutput):
        def to_tuple(self) -> tuple:
            return tuple(
                self[k] if k not in ("image_outputs", "video_outputs", "audio_outputs") else getattr(self, k).to_tuple()
                for k in self.keys()
            )

        @property
        def cache(self) -> Cache | None:
            """transformers 5.24's name of `past_key_values`."""
            return self.past_key_values

    @dataclass
    class MultimodalBaseModelOutputWithPast(_MultimodalModelOutput):
        last_hidden_state: torch.FloatTensor | None = None
        past_key_values: Cache | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        image_outputs: BaseModelOutputWithPooling | None = None
        video_outputs: BaseModelOutputWithPooling | None = None
        audio_outputs: BaseModelOutputWithPooling | None = None

    @dataclass
    class MultimodalCausalLMOutputWithPast(_MultimodalModelOutput):
        loss: torch.FloatTensor | None = None
        logits: torch.FloatTensor | None = None
        past_key_values: Cache | None = None
        hidden_states: tuple[torch.FloatTensor, ...] | None = None
        attentions: tuple[torch.FloatTensor, ...] | None = None
        image_outputs: BaseModelOutputWithPooling | None = None
        video_outputs: BaseModelOutputWithPooling | None = None
        audio_outputs: BaseModelOutputWithPooling | None = None


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers 5.19

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The positions of `hidden_states` `(B, T, D)` whose logits are wanted: the last `logits_to_keep` (0: all), the
        positions in a 1D tensor or, per sample, a 2D integer one; a 2D bool mask keeps its `True` ones, flattened."""
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                return hidden_states[logits_to_keep]
            return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden_states[:, logits_to_keep, :]
