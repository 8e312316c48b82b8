"""Config of the Flamingo-style family: perceiver resampler + tanh-gated cross-attention inside a frozen LM."""

from .configuration_base import FusionConfig, check_choice, check_positive_int


class FusionFlamingoConfig(FusionConfig):
    r"""
    Configuration of [`FusionFlamingoForConditionalGeneration`]. Takes every field of [`FusionConfig`] (defaults: the
    last vision layer before any final norm, patch tokens only — OpenFlamingo's features) and:

    Cross-attention goes before decoder layer `i` for every `i` in `cross_attention_layers`, or, when that is
    `None`, for every `i` with `(i + 1) % cross_attention_every_n_layers == 0` (OpenFlamingo's placement).
    `media_token_id` is another name for `image_token_id`: one `<image>` token per image, embedded by the LM.
    Video (`video_token_id`, which needs `max_num_frames`): a clip is one media marked by one `<video>` token; each
    frame's features get the learned time embedding of its position, and the resampler reads all the frames together,
    so a clip of any length gives `num_latents` latents. An image takes no time embedding.

    Example:

    ```python
    >>> from vlm_fusion import FusionFlamingoConfig
    >>> config = FusionFlamingoConfig(text_config={"model_type": "llama", "num_hidden_layers": 8},
    ...                               cross_attention_every_n_layers=4)
    >>> config.gated_layer_indices()
    [3, 7]
    ```
    """

    model_type = "fusion_flamingo"
    attribute_map = {"media_token_id": "image_token_id"}

    vision_feature_layer: int = -1
    num_latents: int = 64  # latents the resampler keeps per image
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_head_dim: int = 64
    perceiver_ff_mult: int = 4
    max_num_media: int | None = None  # learned media-time embeddings (per image index within a sample)
    max_num_frames: int | None = None  # learned time embeddings, one per frame of a clip (images take none)
    cross_attention_heads: int = 8
    cross_attention_head_dim: int = 64
    cross_attention_ff_mult: int = 4
    cross_attention_every_n_layers: int = 1
    cross_attention_layers: list[int] | None = None  # explicit decoder-layer indices; overrides the line above
    only_attend_immediate_media: bool = True  # text sees only its latest image (else every earlier image)
    end_of_chunk_token_id: int | None = None  # `<|endofchunk|>`, closes an image-text chunk
    cross_attention_style: str = "openflamingo"  # "idefics": RMSNorm, SwiGLU feed-forward of the LM's width and act
    gate_shape: str = "scalar"  # "vector": one tanh gate per hidden unit (IDEFICS's alpha_type="vector")
    perceiver_activation: str = "gelu"  # "relu" in IDEFICS's resampler

    def validate_fusion_fields(self):
        super().validate_fusion_fields()
        for name in ("num_latents", "perceiver_depth", "perceiver_heads", "perceiver_head_dim", "perceiver_ff_mult",
                     "cross_attention_heads", "cross_attention_head_dim", "cross_attention_ff_mult",
                     "cross_attention_every_n_layers"):
            check_positive_int(name, getattr(self, name))
        for name in ("max_num_media", "max_num_frames"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.video_token_id is not None and self.max_num_frames is None:
            raise ValueError("`max_num_frames` must be set when `video_token_id` is: a clip's frames need their "
                             "time embeddings.")
        check_choice("cross_attention_style", self.cross_attention_style, {"openflamingo", "idefics"})
        check_choice("gate_shape", self.gate_shape, {"scalar", "vector"})
        check_choice("perceiver_activation", self.perceiver_activation, {"gelu", "relu"})
        if not isinstance(self.only_attend_immediate_media, bool):
            raise ValueError(f"`only_attend_immediate_media` must be a bool, got {self.only_attend_immediate_media!r}.")
        if self.end_of_chunk_token_id is not None and (
            not isinstance(self.end_of_chunk_token_id, int) or self.end_of_chunk_token_id < 0
        ):
            raise ValueError(f"`end_of_chunk_token_id` must be a non-negative integer, got {self.end_of_chunk_token_id!r}.")
        num_layers = self.text_config.num_hidden_layers
        layers = self.cross_attention_layers
        if layers is not None:
            if (not isinstance(layers, (list, tuple)) or not layers or len(set(layers)) != len(layers)
                    or not all(isinstance(i, int) and 0 <= i < num_layers for i in layers)):
                raise ValueError(
                    f"`cross_attention_layers` must be distinct decoder-layer indices in [0, {num_layers}), got {layers!r}."
                )
            self.cross_attention_layers = sorted(layers)
        elif self.cross_attention_every_n_layers > num_layers:
            raise ValueError(
                f"`cross_attention_every_n_layers` ({self.cross_attention_every_n_layers}) exceeds the LM's "
                f"{num_layers} layers: no layer would cross-attend."
            )

    def gated_layer_indices(self) -> list[int]:
        """Decoder layers that get a gated cross-attention block in front of them."""
        if self.cross_attention_layers is not None:
            return list(self.cross_attention_layers)
        n = self.cross_attention_every_n_layers
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % n == 0]

    def model_card_fields(self) -> dict:
        """The card's resampler, gated layers and their style."""
        return dict(num_latents=self.num_latents, perceiver_depth=self.perceiver_depth,
                    gated_layers=", ".join(map(str, self.gated_layer_indices())),
                    idefics=self.cross_attention_style == "idefics", gate_shape=self.gate_shape)

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Tokens an image occupies in the text: one `<image>` marker; the latents reach the LM by cross-attention."""
        return 1

    def video_token_counts(self) -> tuple[int, int]:
        """A clip is one `<video>` marker, whatever its frames: its latents reach the LM by cross-attention."""
        return 0, 1
