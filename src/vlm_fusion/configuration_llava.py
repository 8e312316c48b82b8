"""Config of the LLaVA-style family: vision features -> projector -> visual tokens spliced into the LM input."""

import math

from .configuration_base import FusionConfig, check_choice
from .anyres import num_tokens
from .vision import num_visual_tokens

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
VIDEO_POOLINGS = ("average", "max", "bilinear")


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
        anyres_max_tiles (`int`, *optional*):
            LLaVA-OneVision's `anyres_max_N`: when an image's unpadded grid holds more than about N tiles' features
            (`sqrt(h * w / (N * p * p)) > 1.1`, p x p patches a tile), it is bilinearly resized down to N tiles'
            worth before the newlines are added. `None` (default): LLaVA-NeXT's anyres, never resized.
        video_pooling (`str`, *optional*):
            How each frame of a clip is reduced on its p x p patch grid. `"average"` / `"max"` (LLaVA-NeXT-Video):
            the vision features are pooled by a `video_pool_stride` window and stride before the projector,
            `floor(p / stride)` a side. `"bilinear"` (LLaVA-OneVision): the projected tokens are bilinearly
            resized to `ceil(p / stride)` a side after the projector. `None` (default): every patch of every frame.
        video_pool_stride (`int`, *optional*, defaults to 2):
            The pooling's window and stride (`"average"`, `"max"`) or its down-scaling factor (`"bilinear"`).
        video_newline (`bool`, *optional*, defaults to `False`):
            Whether a learned newline (`image_newline`) follows each clip, as LLaVA-OneVision appends one.

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
    anyres_max_tiles: int | None = None  # OneVision's anyres_max_N: grids above N tiles' features resized down
    video_pooling: str | None = None  # per frame: "average" | "max" (before the projector) | "bilinear" (after); None
    video_pool_stride: int = 2  # the video pooling's window and stride, or its down-scaling factor
    video_newline: bool = False  # a learned newline (image_newline) after each clip (LLaVA-OneVision)

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
        if self.anyres_max_tiles is not None:
            tiles = self.anyres_max_tiles
            if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
                raise ValueError(f"`anyres_max_tiles` must be a positive integer or None, got {tiles!r}.")
            if self.image_grid_pinpoints is None:
                raise ValueError("`anyres_max_tiles` needs `image_grid_pinpoints`: it bounds an anyres grid.")
        if self.video_pooling is not None:
            check_choice("video_pooling", self.video_pooling, VIDEO_POOLINGS)
        stride = self.video_pool_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"`video_pool_stride` must be a positive integer, got {stride!r}.")
        if not isinstance(self.video_newline, bool):
            raise ValueError(f"`video_newline` must be a bool, got {self.video_newline!r}.")
        if self.video_pooling is not None:
            size, patch = self.vision_config.image_size, self.vision_config.patch_size
            side = size // patch
            if self.video_pooling != "bilinear" and stride > side:
                raise ValueError(f"`video_pool_stride` ({stride}) must not exceed the frame's {side} x {side} "
                                 "patch grid.")
            if num_visual_tokens(self.vision_config, size, size, self.vision_feature_select_strategy) != side * side:
                raise ValueError(f"`video_pooling` needs each frame's features to form its {side} x {side} patch grid: "
                                 "use `vision_feature_select_strategy='default'` (or a tower without a CLS token).")

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Visual tokens the LM sees for one `height` x `width` image (default: the tower's `image_size`); with
        `image_grid_pinpoints`, for the image's original size (anyres)."""
        size = self.vision_config.image_size
        if self.image_grid_pinpoints is not None:
            return num_tokens((height or size, width or size), pinpoints=self.image_grid_pinpoints, tile=size,
                              patch=self.vision_config.patch_size, max_tiles=self.anyres_max_tiles)
        return num_visual_tokens(
            self.vision_config, height or size, width or size, self.vision_feature_select_strategy
        )

    def model_card_fields(self) -> dict:
        """The card's projector, feature selection, anyres grids and clip reading."""
        projector = "2-layer GELU MLP" if self.projector_type == "mlp2x_gelu" else "linear"
        anyres = self.image_grid_pinpoints and ", ".join(f"{h}x{w}" for h, w in self.image_grid_pinpoints)
        if self.anyres_max_tiles is not None:
            anyres = f"{anyres}; a grid above {self.anyres_max_tiles} tiles' features resized down, as OneVision's"
        return dict(projector=projector, vision_feature_layer=self.vision_feature_layer,
                    strategy=self.vision_feature_select_strategy, anyres=anyres, video=self.video_card_text())

    def video_card_text(self) -> str | None:
        """One sentence on how the model reads clips, or `None` without a video path."""
        if self.video_token_id is None:
            return None
        per_frame, per_clip = self.video_token_counts()
        stride = self.video_pool_stride
        how = {None: "every patch of each frame is projected",
               "average": f"each frame's patch features are average-pooled ({stride} x {stride}) before the "
                          "projector, as LLaVA-NeXT-Video does",
               "max": f"each frame's patch features are max-pooled ({stride} x {stride}) before the projector, as "
                      "LLaVA-NeXT-Video does",
               "bilinear": f"each frame's projected tokens are bilinearly resized down {stride}x, as LLaVA-OneVision "
                           "does"}[self.video_pooling]
        newline = ", then a learned newline after the clip" if per_clip else ""
        return f"Clips are read frame by frame: {how} ({per_frame} tokens a frame{newline})."

    def video_token_counts(self) -> tuple[int, int]:
        """`(per_frame, per_clip)`: each frame's tokens after `video_pooling`, and the clip's newline."""
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        side, stride = size // patch, self.video_pool_stride
        if self.video_pooling is None:
            per_frame = num_visual_tokens(self.vision_config, size, size, self.vision_feature_select_strategy)
        elif self.video_pooling == "bilinear":
            per_frame = math.ceil(side / stride) ** 2
        else:  # a pooling window: floor, as nn.AvgPool2d / nn.MaxPool2d
            per_frame = (side // stride) ** 2
        return per_frame, int(self.video_newline)
