"""Config of the BLIP-2-style family: a Q-Former compresses the image's patches to N_q tokens for the LM."""

from .configuration_base import FusionConfig, check_fraction, check_positive_int


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

    def num_image_tokens(self, height: int | None = None, width: int | None = None) -> int:
        """Visual tokens the LM sees per image: always `num_query_tokens`, whatever the resolution."""
        return self.num_query_tokens
