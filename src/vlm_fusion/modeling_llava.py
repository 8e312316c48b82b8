"""The LLaVA-style family: each patch feature is projected to the LM width and takes one `<image>` position.

h_v = W2 GELU(W1 g_v + b1) + b2   (`mlp2x_gelu`),   h_v = W g_v + b   (`linear`)

With `image_grid_pinpoints` (LLaVA-NeXT "anyres") each image arrives as tiles, base tile first; every tile is
projected, and `anyres.pack` lays the grid out unpadded with a learned `image_newline` after each row.

A clip's frames each give a p x p patch grid; `video_pooling` reduces it (`"average"` / `"max"` before the projector,
LLaVA-NeXT-Video; `"bilinear"` after it, LLaVA-OneVision), the frames follow one another and, with `video_newline`,
`image_newline` closes the clip.

Module and state-dict names are those of transformers' `Llava` (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`).

Legend: N images, P visual tokens per image, D_v vision width, D LM width; V clips, F frames per clip, p x p patch grid
of a frame, q x q after pooling.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin

from transformers import initialization as init

from .anyres import num_tiles, pack
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
        # a tensor of its own, not a view: a linear layer on (N, P, D_v) returns a view of its 2-D product, and FSDP2,
        # which hooks its backward on the output of the unit it wraps, warns that an in-place op on a view drops it
        return hidden.clone() if hidden._base is not None else hidden


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
    _bridge_parameters = ["image_newline"]  # anyres, or video_newline
    _unquantized_modules = FusionModel._unquantized_modules + [r"(?:model\.)?multi_modal_projector"]
    _image_inputs = ("image_sizes",)  # anyres: each image's original (height, width)
    _per_image_inputs = ("image_sizes",)

    def __init__(self, config: FusionLlavaConfig, **parts):
        super().__init__(config, **parts)
        self.multi_modal_projector = FusionLlavaProjector(
            vision_dim=config.vision_config.hidden_size,
            text_dim=config.text_config.hidden_size,
            projector_type=config.projector_type,
            bias=config.projector_bias,
        )
        if config.image_grid_pinpoints is not None or config.video_newline:
            # ends each grid row (anyres) and each clip (video_newline)
            self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self and hasattr(self, "image_newline"):
            init.normal_(self.image_newline, std=self.config.text_config.hidden_size ** -0.5)

    @property
    def anyres(self) -> dict | None:
        """The tiling arithmetic's arguments, or `None` for one fixed-size image."""
        if self.config.image_grid_pinpoints is None:
            return None
        return dict(pinpoints=self.config.image_grid_pinpoints, tile=self.config.vision_config.image_size,
                    patch=self.config.vision_config.patch_size, max_tiles=self.config.anyres_max_tiles)

    def tokens_per_image(self, image_sizes=None, **image_inputs) -> list[int] | None:
        if self.anyres is None or image_sizes is None:
            return None
        return [self.config.num_image_tokens(int(h), int(w)) for h, w in image_sizes.tolist()]

    def blank_image_inputs(self) -> dict:
        inputs = super().blank_image_inputs()
        if self.anyres is None:
            return inputs
        size = self.anyres["tile"]
        tiles = num_tiles((size, size), self.anyres["pinpoints"], size)
        image_sizes = torch.tensor([[size, size]], device=inputs["pixel_values"].device)
        return {"pixel_values": inputs["pixel_values"][:, None].expand(-1, tiles, -1, -1, -1), "image_sizes": image_sizes}

    def get_image_features(self, pixel_values: torch.FloatTensor, image_sizes: torch.LongTensor | None = None,
                           **kwargs):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`, or with anyres
                `(num_images, max_tiles, channels, height, width)`: each image's tiles, base tile first).
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`, *optional*): anyres only, each image's
                original (height, width).

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` holds the visual tokens, `(num_images, num_tokens,
            hidden_size)`, or with anyres one `(num_tokens_i, hidden_size)` per image.
        """
        if self.anyres is None:
            return super().get_image_features(pixel_values, **kwargs)
        if image_sizes is None:
            raise ValueError("This model tiles images (anyres): pass `image_sizes` (the processor gives them).")
        tiles = [num_tiles(size, self.anyres["pinpoints"], self.anyres["tile"]) for size in image_sizes.tolist()]
        if pixel_values.dim() == 5:  # (N, max_tiles, C, H, W) -> the real tiles of every image (sum T, C, H, W)
            pixel_values = torch.cat([image[:count] for image, count in zip(pixel_values, tiles)])
        return super().get_image_features(pixel_values, image_sizes=image_sizes, tiles=tiles, **kwargs)

    def encode_images(self, features: torch.Tensor, image_sizes=None, tiles=None, **kwargs):
        projected = self.multi_modal_projector(features.to(self.multi_modal_projector.linear_1.weight.dtype))  # (N, P, D)
        if tiles is None:
            return projected
        per_image = projected.split(tiles)  # (T_i, P, D) each
        return [pack(image, size, newline=self.image_newline, **self.anyres)
                for image, size in zip(per_image, image_sizes.tolist())]  # (num_tokens_i, D) each

    def encode_videos(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        """The frames' features `(V, F, p*p, D_v)` -> each clip's visual tokens `(V, F*q*q (+1), D)`: pooled on the
        patch grid (`video_pooling`), projected, frame after frame, then the newline (`video_newline`)."""
        V, F, N, D_v = features.shape
        pooling, stride = self.config.video_pooling, self.config.video_pool_stride
        p = math.isqrt(N)  # with pooling, the config made sure N = p*p
        features = features.reshape(V * F, N, D_v)  # (V*F, p*p, D_v)
        if pooling in ("average", "max"):  # LLaVA-NeXT-Video: on the vision features
            pool = nn.functional.avg_pool2d if pooling == "average" else nn.functional.max_pool2d
            grid = features.unflatten(1, (p, p)).permute(0, 3, 1, 2)  # (V*F, D_v, p, p)
            features = pool(grid, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)  # (V*F, q*q, D_v)
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        tokens = self.multi_modal_projector(features.to(dtype))  # (V*F, q*q or p*p, D)
        if pooling == "bilinear":
            q = math.ceil(p / stride)
            grid = tokens.unflatten(1, (p, p)).permute(0, 3, 1, 2)  # (V*F, D, p, p)
            grid = nn.functional.interpolate(grid, size=(q, q), mode="bilinear")  # (V*F, D, q, q)
            tokens = grid.flatten(2).transpose(1, 2)  # (V*F, q*q, D)
        tokens = tokens.reshape(V, -1, tokens.shape[-1])  # (V, F*q*q, D)
        if self.config.video_newline:
            newline = self.image_newline.to(tokens.dtype).expand(V, 1, -1)  # (V, 1, D)
            tokens = torch.cat([tokens, newline], dim=1)  # (V, F*q*q + 1, D)
        return tokens


class FusionLlavaForConditionalGeneration(FusionForConditionalGeneration, GenerationMixin):
    """[`FusionLlavaModel`] with the LM's head: what `AutoModelForImageTextToText` builds for `fusion_llava`."""

    config_class = FusionLlavaConfig
    model_class = FusionLlavaModel
