"""The LLaVA-style family: each patch feature is projected to the LM width and takes one `<image>` position.

h_v = W2 GELU(W1 g_v + b1) + b2   (`mlp2x_gelu`),   h_v = W g_v + b   (`linear`)

Module and state-dict names are those of transformers' `Llava` (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`).

Legend: N images, P visual tokens per image, D_v vision width, D LM width.
"""

import torch
from torch import nn
from transformers import GenerationMixin

from .configuration_llava import FusionLlavaConfig
from .modeling_base import FusionForConditionalGeneration, FusionModel


class FusionLlavaProjector(nn.Module):
    """Maps vision features `(N, P, D_v)` to visual tokens `(N, P, D)`."""

    def __init__(self, *, vision_dim: int, text_dim: int, projector_type: str, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        if projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(image_features)
        if hasattr(self, "linear_2"):
            hidden = self.linear_2(self.act(hidden))
        return hidden


class FusionLlavaModel(FusionModel):
    r"""
    A vision tower, a projector and the LM's base decoder, without a head: the image's patch features, projected to
    the LM width, replace the `<image>` placeholders of the text. Any transformers vision model and any LM plug in.

    Example:

    ```python
    >>> import torch
    >>> from vlm_fusion import FusionLlavaConfig, FusionLlavaModel
    >>> config = FusionLlavaConfig(
    ...     vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
    ...                    "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
    ...     text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100},
    ...     image_token_id=99,
    ... )
    >>> model = FusionLlavaModel(config)
    >>> model.get_image_features(torch.randn(2, 3, 32, 32)).pooler_output.shape
    torch.Size([2, 16, 32])
    ```
    """

    config_class = FusionLlavaConfig
    _no_split_modules = ["FusionLlavaProjector"]
    _bridge_modules = ["multi_modal_projector"]
    _unquantized_modules = FusionModel._unquantized_modules + [r"(?:model\.)?multi_modal_projector"]

    def __init__(self, config: FusionLlavaConfig, **parts):
        super().__init__(config, **parts)
        self.multi_modal_projector = FusionLlavaProjector(
            vision_dim=config.vision_config.hidden_size,
            text_dim=config.text_config.hidden_size,
            projector_type=config.projector_type,
            bias=config.projector_bias,
        )
        self.post_init()

    def encode_images(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))  # (N, P, D)


class FusionLlavaForConditionalGeneration(FusionForConditionalGeneration, GenerationMixin):
    """[`FusionLlavaModel`] with the LM's head: what `AutoModelForImageTextToText` builds for `fusion_llava`."""

    config_class = FusionLlavaConfig
    model_class = FusionLlavaModel
