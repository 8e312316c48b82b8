"""Config of the LLaVA-style family: vision features -> projector -> visual tokens spliced into the LM input."""

from .configuration_base import FusionConfig, check_choice
from .anyres import num_tokens
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
        image_grid_pinpoints (`list[list[int]]`, *optional*):
            Dynamic resolution (LLaVA-NeXT "anyres"): the `[height, width]` grids an image may be tiled to, each a
            multiple of the tower's `image_size`. An image then takes a variable number of tokens (`num_image_tokens`
            of its size); `None` (default) keeps one fixed-size image.

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
    image_grid_pinpoints: list[list[int]] | None = None  # anyres grids [height, width] (LLaVA-NeXT); None: fixed size

    def validate_fusion_fields(self):
        super().validate_fusion_fields()
        check_choice("projector_type", self.projector_type, PROJECTOR_TYPES)
        if not isinstance(self.projector_bias, bool):
            raise ValueError(f"`projector_bias` must be a bool, got {self.projector_bias!r}.")
        if self.image_grid_pinpoints is not None:
            tile = self.vision_config.image_size
            pinpoints = self.image_grid_pinpoints
            if (not isinstance(pinpoints, (list, tuple)) or not pinpoints
                    or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) and x > 0 and x % tile == 0 for x in p)
                               for p in pinpoints)):
                raise ValueError(f"`image_grid_pinpoints` must be [height, width] pairs, each a multiple of the tower's "
                                 f"image_size ({tile}), got {pinpoints!r}.")
            self.image_grid_pinpoints = [list(p) for p in pinpoints]
            if self.vision_feature_select_strategy != "default":
                raise ValueError("`image_grid_pinpoints` (anyres) needs `vision_feature_select_strategy='default'`: "
                                 "each tile's patches form the grid.")

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Visual tokens the LM sees for one `height` x `width` image (default: the tower's `image_size`); with
        `image_grid_pinpoints`, for the image's original size (anyres)."""
        size = self.vision_config.image_size
        if self.image_grid_pinpoints is not None:
            return num_tokens((height or size, width or size), pinpoints=self.image_grid_pinpoints, tile=size,
                                     patch=self.vision_config.patch_size)
        return num_visual_tokens(
            self.vision_config, height or size, width or size, self.vision_feature_select_strategy
        )
