"""Config of the BLIP-2-style family: a Q-Former compresses the image's patches to N_q tokens for the LM."""

from .compat import TRANSFORMERS_BUILDS_SUB_CONFIGS
from .configuration_base import FusionConfig, check_choice, check_fraction, check_positive_int

# How a clip of F frames reaches the LM (`video_bridge`).
VIDEO_BRIDGES = {
    "per_frame",  # InstructBLIP-Video: every frame through the Q-Former (reading the instruction), N_q x F tokens
    "video_qformer",  # Video-LLaMA: frame positions added, a second Q-Former reads all frames -> a fixed count per clip
}


class FusionBlip2Config(FusionConfig):
    r"""
    Configuration of [`FusionBlip2ForConditionalGeneration`]. Takes every field of [`FusionConfig`] (with BLIP-2's
    defaults: the last vision layer, every token kept) and the Q-Former's own fields.

    Example:

    ```python
    >>> from vlm_fusion import FusionBlip2Config
    >>> config = FusionBlip2Config(num_query_tokens=32, qformer_num_hidden_layers=12)
    >>> config.num_image_tokens()
    32
    ```

    Videos (with a `video_token_id`): `video_bridge="per_frame"` (InstructBLIP-Video) sends every frame through the
    Q-Former, so a clip of F frames takes `num_query_tokens * F` LM positions; `video_bridge="video_qformer"`
    (Video-LLaMA) adds a learned frame-position embedding to each frame's query outputs and lets a small video
    Q-Former (`num_video_query_tokens` queries, `video_qformer_num_hidden_layers` layers, the image Q-Former's width,
    heads and feed-forward, cross-attention in every layer) read all of them: `num_video_query_tokens` per clip,
    whatever F (up to `max_num_frames`).

    ```python
    >>> FusionBlip2Config(num_query_tokens=32, video_token_id=32001).num_video_tokens(8)
    256
    >>> FusionBlip2Config(video_bridge="video_qformer", video_token_id=32001).num_video_tokens(8)
    32
    ```
    """

    model_type = "fusion_blip2"

    vision_feature_layer: int = -1  # the last vision layer, before any final norm (the bridge has its own)
    vision_feature_select_strategy: str = "full"  # BLIP-2 cross-attends to every token, CLS included
    num_query_tokens: int = 32  # N_q: learned queries = visual tokens the LM sees per image
    qformer_hidden_size: int = 768  # D_q
    qformer_num_hidden_layers: int = 12
    qformer_num_attention_heads: int = 12
    qformer_intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # cross-attention to the image in layers 0, f, 2f, ...
    qformer_layer_norm_eps: float = 1e-12
    qformer_dropout: float = 0.1  # attention-probability and hidden dropout inside the Q-Former
    vision_layer_norm_eps: float = 1e-5  # the layer norm between the vision tower and the Q-Former
    qformer_text_input: bool = False  # InstructBLIP: the queries also self-attend to the instruction's tokens
    qformer_vocab_size: int = 30523  # the Q-Former's own (BERT) vocabulary, when it reads text
    qformer_max_position_embeddings: int = 512  # longest instruction the Q-Former reads
    qformer_pad_token_id: int = 0
    video_bridge: str = "per_frame"  # how a clip reaches the LM: "per_frame" (InstructBLIP-Video) or "video_qformer"
    max_num_frames: int = 32  # video_qformer: rows of the frame-position embedding, the longest clip (Video-LLaMA's 32)
    num_video_query_tokens: int = 32  # video_qformer: the video Q-Former's queries = LM tokens per clip
    video_qformer_num_hidden_layers: int = 2  # video_qformer: layers of the video Q-Former (Video-LLaMA's 2)

    def validate_fusion_fields(self):
        super().validate_fusion_fields()
        for name in ("num_query_tokens", "qformer_hidden_size", "qformer_num_hidden_layers",
                     "qformer_num_attention_heads", "qformer_intermediate_size", "cross_attention_frequency"):
            check_positive_int(name, getattr(self, name))
        if self.qformer_hidden_size % self.qformer_num_attention_heads:
            raise ValueError(
                f"`qformer_hidden_size` ({self.qformer_hidden_size}) must be divisible by "
                f"`qformer_num_attention_heads` ({self.qformer_num_attention_heads})."
            )
        check_fraction("qformer_dropout", self.qformer_dropout)
        if not isinstance(self.qformer_text_input, bool):
            raise ValueError(f"`qformer_text_input` must be a bool, got {self.qformer_text_input!r}.")
        for name in ("qformer_vocab_size", "qformer_max_position_embeddings"):
            check_positive_int(name, getattr(self, name))
        if not isinstance(self.qformer_pad_token_id, int) or not 0 <= self.qformer_pad_token_id < self.qformer_vocab_size:
            raise ValueError(f"`qformer_pad_token_id` must be an id below `qformer_vocab_size`, got {self.qformer_pad_token_id!r}.")
        for name in ("qformer_layer_norm_eps", "vision_layer_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        check_choice("video_bridge", self.video_bridge, VIDEO_BRIDGES)
        for name in ("max_num_frames", "num_video_query_tokens", "video_qformer_num_hidden_layers"):
            check_positive_int(name, getattr(self, name))

    def model_card_fields(self) -> dict:
        """The card's Q-Former: its queries, depth, width, cross-attention, and whether it reads the instruction."""
        return dict(self.qformer_card_fields(), instruction_aware=self.qformer_text_input)

    def qformer_card_fields(self) -> dict:
        return dict(num_query_tokens=self.num_query_tokens, qformer_layers=self.qformer_num_hidden_layers,
                    qformer_width=self.qformer_hidden_size, cross_attention_frequency=self.cross_attention_frequency)

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Visual tokens the LM sees per image: always `num_query_tokens`, whatever the resolution."""
        return self.num_query_tokens

    def video_token_counts(self) -> tuple[int, int]:
        """`(per_frame, per_clip)`: `(num_query_tokens, 0)` per frame, or `(0, num_video_query_tokens)` per clip with
        the video Q-Former."""
        if self.video_bridge == "per_frame":
            return self.num_query_tokens, 0
        return 0, self.num_video_query_tokens


class FusionBlip2QFormerConfig(FusionBlip2Config):
    r"""
    Configuration of [`FusionBlip2ForImageTextRetrieval`], BLIP-2's stage 1: a vision tower and a Q-Former with its text
    side and heads (ITC projections, ITM head, ITG head), no LM. Takes the Q-Former fields of [`FusionBlip2Config`]
    (`text_config` stays `None`: the Q-Former reads text in its own vocabulary) and the stage-1 fields below.
    A [`FusionBlip2ForConditionalGeneration`] is built from it and an LM with
    `FusionBlip2ForConditionalGeneration.from_qformer_pretrained`.

    Example:

    ```python
    >>> from vlm_fusion import FusionBlip2QFormerConfig
    >>> from vlm_fusion.tools.tiny import tiny_vision_config
    >>> config = FusionBlip2QFormerConfig(vision_config=tiny_vision_config("siglip"), qformer_vocab_size=100)
    >>> config.embed_dim, config.max_text_length
    (256, 32)
    ```
    """

    model_type = "fusion_blip2_qformer"
    pipeline_tag = "zero-shot-image-classification"  # the card's Hub task: no LM, no generation
    sub_configs_defaults = {"vision_config": FusionBlip2Config.sub_configs_defaults["vision_config"]}
    if not TRANSFORMERS_BUILDS_SUB_CONFIGS:
        sub_configs = {"vision_config": FusionBlip2Config.sub_configs_defaults["vision_config"].config_class}
    required_sub_configs = ("vision_config",)

    qformer_text_input: bool = True  # stage 1 always reads captions
    embed_dim: int = 256  # width of the ITC space (`vision_projection` / `text_projection`)
    max_text_length: int = 32  # captions are cut to this many Q-Former tokens (LAVIS's max_txt_len)
    qformer_bos_token_id: int = 30522  # `[DEC]`: replaces `[CLS]` as the first token of the ITG pass
    temperature: float = 0.07  # initial ITC temperature (learned, used clamped to [0.001, 0.5] as in BLIP)
    label_smoothing: float = 0.1  # on the ITC and ITG cross-entropies (LAVIS)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = True  # ITG's decoder is the Q-Former's word embeddings (BERT's, as LAVIS ties them)

    def validate_fusion_fields(self):
        super().validate_fusion_fields()
        if self.text_config is not None:
            raise ValueError("`text_config` must be None: a stage-1 Q-Former has no language model (compose one with "
                             "`FusionBlip2ForConditionalGeneration.from_qformer_pretrained`).")
        if not self.qformer_text_input:
            raise ValueError("`qformer_text_input` must be True: the stage-1 Q-Former reads captions.")
        for name in ("embed_dim", "max_text_length"):
            check_positive_int(name, getattr(self, name))
        if self.max_text_length > self.qformer_max_position_embeddings:
            raise ValueError(f"`max_text_length` ({self.max_text_length}) exceeds `qformer_max_position_embeddings` "
                             f"({self.qformer_max_position_embeddings}).")
        if not isinstance(self.qformer_bos_token_id, int) or not 0 <= self.qformer_bos_token_id < self.qformer_vocab_size:
            raise ValueError(f"`qformer_bos_token_id` must be an id below `qformer_vocab_size`, got "
                             f"{self.qformer_bos_token_id!r}.")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0.001 <= self.temperature <= 0.5:
            raise ValueError(f"`temperature` must be a number in [0.001, 0.5], got {self.temperature!r}.")
        check_fraction("label_smoothing", self.label_smoothing)

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        return self.num_query_tokens

    def model_card_fields(self) -> dict:
        """The card's Q-Former and its contrastive space."""
        return dict(self.qformer_card_fields(), embed_dim=self.embed_dim, max_text_length=self.max_text_length)

    def generation_fields(self) -> dict:
        """The fields a [`FusionBlip2Config`] takes over from this stage-1 config (the tower's and the Q-Former's)."""
        own = {"embed_dim", "max_text_length", "qformer_bos_token_id", "temperature", "label_smoothing",
               "qformer_text_input", "text_config", "image_token_id", "origin", "base_models", "license"}
        fields = {f for f in FusionBlip2Config.__dataclass_fields__ if f.startswith(("qformer_", "vision_"))}
        fields |= {"num_query_tokens", "cross_attention_frequency"}
        return {name: getattr(self, name) for name in sorted(fields - own)}
