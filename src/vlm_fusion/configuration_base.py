"""Configuration shared by every vlm-fusion family.

A fusion config nests exactly two backbone configs, ``vision_config`` and ``text_config`` (config objects or
dicts carrying a ``model_type``), and adds flat, scalar bridge fields. Every field is validated at construction
and an invalid value raises ``ValueError`` naming the field.
"""

import copy

from transformers import AutoConfig, PreTrainedConfig

from .compat import TRANSFORMERS_BUILDS_SUB_CONFIGS, SubConfigSpec, build_sub_configs

# Vision configs of composite image-text models: the fusion model only needs their vision half.
_COMPOSITE_VISION_KEY = "vision_config"


def _vision_half(config):
    """`CLIPConfig`, `SiglipConfig`, `Blip2Config`, ... -> their vision sub-config; a vision config unchanged."""
    sub = getattr(config, _COMPOSITE_VISION_KEY, None)
    return sub if isinstance(sub, PreTrainedConfig) else config


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {sorted(choices)}, got {value!r}.")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")


class FusionConfig(PreTrainedConfig):
    r"""
    Base class of the vlm-fusion configs: a vision backbone config, a causal-LM config and the image placeholder.

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the vision tower (any transformers vision model: CLIP, SigLIP, DINOv2, ViT, BLIP-2's EVA ViT...).
            A composite config such as `CLIPConfig` contributes its `vision_config`. Defaults to CLIP ViT-B/32.
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the causal language model (anything `AutoModelForCausalLM` builds). Defaults to Llama.
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder token. It may lie outside the LM vocabulary: placeholder positions are
            never looked up in the LM's embedding table.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Index into the vision tower's `hidden_states` (0 = patch embeddings, -1 = last layer before any final norm).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` keeps only the patch tokens (drops CLS and register tokens), `"full"` keeps every token.
        video_token_id (`int`, *optional*):
            Id of the `<video>` placeholder; `None` (default): the model takes no clips. Like `image_token_id`, it may
            lie outside the LM vocabulary. A clip of F frames takes `num_video_tokens(F)` placeholders.
        origin, base_models, license (*optional*): provenance written into the model card.
    """

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }
    if not TRANSFORMERS_BUILDS_SUB_CONFIGS:  # transformers 5.19 reads the sub-configs' classes here
        sub_configs = {key: spec.config_class for key, spec in sub_configs_defaults.items()}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    video_token_id: int | None = None  # the `<video>` placeholder; None: no video path
    tie_word_embeddings: bool = False
    # Provenance, for the model card only.
    origin: str | None = None  # how the weights were produced ("composed from X + Y", "converted from Z")
    base_models: list[str] | None = None  # Hub ids the weights come from (the card's `base_model`)
    license: str | None = None  # the card's `license`, when known
    required_sub_configs = ("vision_config", "text_config")  # what a saved config must name (not a field)

    def __post_init__(self, **kwargs):
        # Never mutate configs handed in (transformers resets their attention implementation below).
        self.vision_config = copy.deepcopy(self.vision_config)
        self.text_config = copy.deepcopy(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = dict(self.vision_config)
            if isinstance(self.vision_config.get(_COMPOSITE_VISION_KEY), dict):
                self.vision_config = self.vision_config[_COMPOSITE_VISION_KEY]
        kwargs = build_sub_configs(self, kwargs)
        super().__post_init__(**kwargs)
        self.vision_config = _vision_half(self.vision_config)
        # The wrapped causal LM ties its own head; mirror its choice so `tie_weights` sees it at the top level too.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.validate_fusion_fields()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A saved config must name both backbones: without them it would silently build the default CLIP and Llama."""
        missing = [key for key in cls.required_sub_configs if not config_dict.get(key)]
        if missing:
            raise ValueError(
                f"This {cls.model_type} config has no {' and no '.join(f'`{k}`' for k in missing)}: a saved vlm-fusion "
                "config names its backbones (save it again with `save_pretrained`, or add the missing sub-config)."
            )
        return super().from_dict(config_dict, **kwargs)

    def validate_fusion_fields(self):
        """Raise `ValueError` naming the first invalid field. Families extend this with their own fields."""
        if isinstance(self.image_token_id, bool) or not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ValueError(f"`image_token_id` must be a non-negative integer, got {self.image_token_id!r}.")
        check_choice("vision_feature_select_strategy", self.vision_feature_select_strategy, {"default", "full"})
        if self.video_token_id is not None:
            if isinstance(self.video_token_id, bool) or not isinstance(self.video_token_id, int) or self.video_token_id < 0:
                raise ValueError(f"`video_token_id` must be a non-negative integer or None, got {self.video_token_id!r}.")
            if self.video_token_id == self.image_token_id:
                raise ValueError(f"`video_token_id` and `image_token_id` must differ, both are {self.image_token_id}.")
        num_layers = getattr(self.vision_config, "num_hidden_layers", None)
        layer = self.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"`vision_feature_layer` must be an integer, got {layer!r}.")
        if num_layers is not None and not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"`vision_feature_layer` must index one of the {num_layers + 1} hidden states of the vision tower "
                f"(from {-(num_layers + 1)} to {num_layers}), got {layer}."
            )

    # ---- the model card: each family says what its template (`model_cards/<model_type>.md`) shows -----------------
    pipeline_tag = "image-text-to-text"  # the card's Hub task

    def model_card_fields(self) -> dict:
        """The template's fields that describe this family's bridge. Each family overrides this."""
        raise NotImplementedError(f"The {self.model_type} family declares no model card fields.")

    # ---- videos: each family says what a clip costs ------------------------------------------------------------
    def video_token_counts(self) -> tuple[int, int]:
        """`(per_frame, per_clip)`: a clip of F frames takes `F * per_frame + per_clip` LM positions. A family
        with a video path overrides this."""
        raise ValueError(f"The {self.model_type} family has no video path.")

    def num_video_tokens(self, num_frames: int) -> int:
        """Visual tokens (LM positions) one clip of `num_frames` frames takes."""
        per_frame, per_clip = self.video_token_counts()
        return num_frames * per_frame + per_clip
