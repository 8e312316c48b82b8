"""The language side of every family: a causal LM split into its base decoder and its head, and what the head does.

A vlm-fusion model keeps the LM's base decoder (what `AutoModel` builds for `text_config`) as `language_model` and
the LM's own head as `lm_head`; whatever the causal LM's forward does to its logits beyond the linear map (Cohere's
scale, Granite's scaling, Gemma's soft-capping) is reproduced from its config, and an LM whose head does anything
else is refused when the model is built.
"""

import inspect
import re

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

# LM heads that do more than a linear map, reproduced here from the LM's config: attribute -> what the head does.
# Any other `*logit*` attribute a causal LM's forward reads is refused at composition time (see `check_lm_head`).
LOGIT_HANDLING = {
    "logit_scale": lambda logits, scale: logits * scale,  # Cohere
    "logits_scaling": lambda logits, scale: logits / scale,  # Granite
    "final_logit_softcapping": lambda logits, cap: torch.tanh(logits / cap) * cap,  # Gemma 2 / 3
}
# Names a causal LM's forward may mention that do not change what the head computes.
_HARMLESS_LOGIT_NAMES = {"logits", "logits_to_keep", "slice_logits_to_keep", "slice_indices", "CausalLMOutputWithPast"}


def causal_lm_class(text_config) -> type[PreTrainedModel]:
    try:
        return AutoModelForCausalLM._model_mapping[type(text_config)]
    except KeyError:
        raise ValueError(f"No causal LM is known for text config {type(text_config).__name__} ({text_config.model_type!r}).")


def check_lm_head(text_config) -> None:
    """Refuse a causal LM whose head does something to its logits that `LOGIT_HANDLING` does not reproduce."""
    source = inspect.getsource(causal_lm_class(text_config).forward)
    unknown = {name for name in re.findall(r"\b\w*logit\w*\b", source)} - _HARMLESS_LOGIT_NAMES - set(LOGIT_HANDLING)
    if unknown:
        raise ValueError(
            f"{causal_lm_class(text_config).__name__}'s head uses {sorted(unknown)} on its logits, which vlm-fusion does "
            f"not reproduce (it reproduces {sorted(LOGIT_HANDLING)}); this language model is not supported."
        )


def split_causal_lm(causal_lm: PreTrainedModel) -> tuple[PreTrainedModel, nn.Module]:
    """A causal LM -> `(base decoder, lm_head)`, checking the base is what `AutoModel` builds for its config."""
    base, head = causal_lm.base_model, causal_lm.get_output_embeddings()
    expected = AutoModel._model_mapping.get(type(causal_lm.config), None)
    if base is causal_lm or head is None or (expected is not None and type(base) is not expected):
        raise ValueError(
            f"{type(causal_lm).__name__} does not split into a base decoder ({expected and expected.__name__}) and an "
            "LM head; it cannot be the language model of a vlm-fusion model."
        )
    if type(head) is not nn.Linear:
        raise ValueError(f"{type(causal_lm).__name__}'s head is a {type(head).__name__}, not a linear layer: not supported.")
    return base, head


def build_lm_head(text_config) -> nn.Linear:
    """A fresh head shaped like the causal LM's own (width, vocabulary, bias), read off a meta-device instance."""
    with torch.device("meta"):
        _, head = split_causal_lm(AutoModelForCausalLM.from_config(text_config))
    return nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
