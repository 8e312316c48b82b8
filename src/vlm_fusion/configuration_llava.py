"""Config of the LLaVA-style family: vision features -> projector -> visual tokens spliced into the LM input."""

from .configuration_base import FusionConfig, check_choice
from .vision import num_visual_tokens

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


class FusionLlavaConfig(FusionConfig):
    r"""
    Configuration of [`FusionLlavaForConditionalGeneration`]. Takes every field of [`FusionConfig`] and:

    Args:
        projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
            `"linear"` (LLaVA) or `"mlp2x_gelu"` (LLaVA-1.5: linear -> GELU -> linear).
        projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector's linear layers have biases.

    Example:

    ```python
    >>> from vlm_fusion import FusionLlavaConfig
    >>> config = FusionLlavaConfig(
    ...     vision_config={"model_type": "siglip_vision_model", "image_size": 224, "patch_size": 16},
    ...     text_config={"model_type": "gpt2"},
    ...     projector_type="linear",
    ... )
    >>> config.num_image_tokens()
    196
    ```
    """

    model_type = "fusion_llava"

    projector_type: str = "mlp2x_gelu"  # "linear" | "mlp2x_gelu"
    projector_bias: bool = True  # biases in the projector's linear layers

    def validate_fusion_fields(self):
        super().validate_fusion_fields()
        check_choice("projector_type", self.projector_type, PROJECTOR_TYPES)
        if not isinstance(self.projector_bias, bool):
            raise ValueError(f"`projector_bias` must be a bool, got {self.projector_bias!r}.")

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Visual tokens the LM sees for one `height` x `width` image (default: the tower's `image_size`)."""
        size = self.vision_config.image_size
        return num_visual_tokens(
            self.vision_config, height or size, width or size, self.vision_feature_select_strategy
        )
