"""What every vlm-fusion model shares: the headless `Model`, the `ForConditionalGeneration` head, composition.

The layout is transformers 5's own for VLMs (`LlavaModel` / `LlavaForConditionalGeneration`):

    Fusion*ForConditionalGeneration
      model: Fusion*Model
        vision_tower      any transformers vision model             pixels -> (N, V, D_v)
        <bridge>          the family's own modules                  (N, V, D_v) -> visual tokens
        language_model    the LM's base decoder (what `AutoModel` builds for `text_config`), no head
      lm_head             the LM's own head (tied to its input embeddings when the LM ties them)

A family owns only its bridge (`get_image_features`, and for Flamingo the cross-attention hooks); the splice of
visual tokens into the text, the head, the loss, generation and composition from pretrained parts live here.

Legend: B batch, T text positions, N images (all samples together), P visual tokens per image, D LM width.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .checkpoints import FusionCheckpointMixin
from .compat import (
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
    cache_kwargs,
    slice_logits_to_keep,
    takes_cache_as_past_key_values,
)
from .configuration_base import FusionConfig, _vision_half
from .language_model import LOGIT_HANDLING, build_lm_head, check_lm_head, split_causal_lm
from .special_tokens import add_special_token
from .vision import build_vision_tower, load_vision_tower, select_image_features

IGNORE_INDEX = -100
logger = logging.get_logger(__name__)


@dataclass
class FusionModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`): the LM's output.
    cache (`Cache`, *optional*): the language model's KV cache.
    image_outputs (`BaseModelOutputWithPooling`, *optional*): the images encoded in this call; `pooler_output` holds
        the visual tokens `(num_images, num_tokens, hidden_size)` (also as `image_hidden_states`).
    """

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        return None if self.image_outputs is None else self.image_outputs.pooler_output


@dataclass
class FusionCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): next-token loss, image positions ignored.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    cache (`Cache`, *optional*): the language model's KV cache.
    image_outputs (`BaseModelOutputWithPooling`, *optional*): as in [`FusionModelOutputWithPast`].
    """

    @property
    def image_hidden_states(self) -> torch.FloatTensor | None:
        return None if self.image_outputs is None else self.image_outputs.pooler_output


def _mark_initialized(module: torch.nn.Module) -> None:
    """Keep `post_init` from re-initialising a pretrained part handed to the constructor."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor._is_hf_initialized = True


def module_name(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in root.named_modules() if candidate is module)


class FusionPreTrainedModel(FusionCheckpointMixin, PreTrainedModel):
    """What the headless model and the generation model of every family declare to transformers."""

    config_class = FusionConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    # Modules 4-bit/8-bit loading leaves in full precision (regexes matched from the start of module names by
    # transformers, so they hold for the headless model and for the one with the head): the vision tower, the bridge
    # (each family adds its parts) and the LM head.
    _unquantized_modules = [r"(?:model\.)?vision_tower", "lm_head"]
    _bridge_modules: list[str] = []  # names of the family's bridge modules inside the headless model
    _bridge_parameters: list[str] = []  # and of its bridge parameters held there directly (LLaVA-NeXT's image_newline)

    @classmethod
    def is_custom_code(cls) -> bool:
        """
        False: transformers treats code outside its package as "custom" and then skips initialising any module
        without parameters of its own — CLIP's attention, whose `q_proj` std is set by the attention module — so a
        vision tower missing from a checkpoint came out with a generic N(0, 0.02) instead of its own scheme. These
        models initialise through `transformers.initialization` and tie parameters, not modules, as transformers'
        own models do; exported remote code is still custom (`is_remote_code`).
        """
        return cls.is_remote_code()

    def post_init(self):
        """
        transformers' `post_init`, which gathers the parts' `_no_split_modules` (the LM's decoder layer, the tower's
        encoder layer, the bridge's blocks: what device maps keep whole and FSDP wraps as units), less the classes a
        part's family lists that this model does not hold (CLIP's vision tower lists CLIP's text embeddings).
        """
        super().post_init()
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}
        # and the fp32 modules a family lists that this configuration does not build (BLIP-2's video Q-Former)
        names = {part for name, _ in self.named_modules() for part in name.split(".")}
        strict = getattr(self, "_keep_in_fp32_modules_strict", None)
        if strict:
            self._keep_in_fp32_modules_strict = type(strict)(name for name in strict if name in names)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """
        True: `set_attn_implementation` reaches both backbones, transformers models that take any implementation.
        (transformers' heuristic reads an `*Attention(nn.Module)` class in the module as a model that cannot: the
        bridge's own attention — Q-Former, resampler, gated cross-attention — is SDPA whatever is set.)
        """
        return True

    def initialize_weights(self):
        """
        transformers' initialisation, plus the family's own modules that live inside a backbone (Flamingo's gated
        blocks inside the LM's decoder layers), which the walk hands to the backbone's `_init_weights`: unknown to it,
        the gates of a checkpoint without them were left as raw memory instead of 0.
        """
        super().initialize_weights()
        model = getattr(self, "model", self)
        with torch.no_grad():
            for block in model.modules_inside_backbones():
                for module in block.modules():
                    model._init_weights(module)  # `transformers.initialization` leaves loaded tensors alone


class FusionModel(FusionPreTrainedModel):
    r"""
    The headless model of a family: `vision_tower`, the family's bridge, and `language_model` — the LM's base decoder
    (what `AutoModel` builds for `text_config`), without its head. `forward` returns the LM's `last_hidden_state`.

    Contract for a family: build its bridge in `__init__` (then call `post_init()`), name it in `_bridge_modules`,
    and implement `encode_images`; inputs the bridge reads besides the pixels are named in `_image_inputs`. A family
    that reads clips implements `encode_videos` (the frames' features of each clip -> its visual tokens) and its
    config's `video_token_counts`; inputs that go to it are named in `_video_inputs`.
    """

    _image_inputs: tuple[str, ...] = ()  # forward's keyword inputs that go to the image encoding, not the LM
    _per_image_inputs: tuple[str, ...] = ()  # those of them given per image (the others are per sample)
    _video_inputs: tuple[str, ...] = ()  # forward's keyword inputs that go to the video encoding

    def __init__(self, config: FusionConfig, *, vision_tower=None, language_model=None):
        super().__init__(config)
        for part in (vision_tower, language_model):
            if part is not None:
                _mark_initialized(part)
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        # `AutoModel` picks up `text_config._attn_implementation`, so per-backbone attention choices hold.
        self.language_model = language_model if language_model is not None else AutoModel.from_config(config.text_config)
        # One config object per backbone, so `resize_token_embeddings` and friends keep the sub-configs current.
        self.config.text_config = self.language_model.config
        self.config.vision_config = self.vision_tower.config

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def images_per_sample(self, image_mask: torch.BoolTensor, num_images: int, tokens_per_image=None) -> list[int]:
        """
        How many of the batch's `num_images` images belong to each sample, from its count of placeholder positions in
        `image_mask` `(B, T)` (see `get_placeholder_mask`); images whose token counts differ (anyres) give theirs in
        `tokens_per_image`, in order.
        """
        counts = image_mask.sum(-1).tolist()  # (B,)
        if tokens_per_image is None:
            total = sum(counts)
            if num_images == 0 or total == 0 or total % num_images:
                raise ValueError(f"{total} image tokens cannot be shared evenly among {num_images} images.")
            return [count // (total // num_images) for count in counts]
        per_sample, image = [], 0
        for count in counts:  # each sample takes the next images until their tokens fill its placeholders
            taken = 0
            while count > 0 and image < len(tokens_per_image):
                count -= tokens_per_image[image]
                image, taken = image + 1, taken + 1
            if count != 0:
                raise ValueError(f"The image tokens of a sample do not add up to whole images ({tokens_per_image}).")
            per_sample.append(taken)
        return per_sample

    def tokens_per_image(self, **image_inputs) -> list[int] | None:
        """Each image's token count when they differ (anyres LLaVA-style); `None` when every image takes the same."""
        return None

    def bridge_modules(self) -> dict[str, nn.Module]:
        """The parts of the model that are neither backbone: what the family adds and trains."""
        return {name: getattr(self, name) for name in self._bridge_modules}

    def modules_inside_backbones(self) -> list[nn.Module]:
        """The family's modules that live inside the vision tower or the LM (none but for Flamingo)."""
        return []

    # ---- images ---------------------------------------------------------------------------------------------
    def get_vision_features(self, pixel_values: torch.FloatTensor, **kwargs):
        """The tower's `vision_feature_layer` features `(num_images, num_tokens, vision_hidden_size)` and its outputs."""
        return select_image_features(
            self.vision_tower, pixel_values, layer=self.config.vision_feature_layer,
            strategy=self.config.vision_feature_select_strategy, **kwargs,
        )

    def encode_images(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        """The family's bridge: vision features `(N, V, D_v)` -> visual tokens `(N, P, D)`."""
        raise NotImplementedError

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`).
            output_hidden_states, output_attentions (`bool`, *optional*): return the vision tower's; default to its
                config's (`vision_config.output_hidden_states` / `output_attentions`), as the tower itself does.

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` holds the visual tokens, `(num_images, num_tokens,
            hidden_size)`; `last_hidden_state`, `hidden_states` and `attentions` are the vision tower's.
        """
        vision_config = self.vision_tower.config
        if output_hidden_states is None:
            output_hidden_states = vision_config.output_hidden_states
        if output_attentions is None:
            output_attentions = vision_config.output_attentions
        features, tower = self.get_vision_features(pixel_values, output_attentions=output_attentions)
        visual_tokens = self.encode_images(features, **kwargs)
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state,
            pooler_output=visual_tokens,
            hidden_states=tower.hidden_states if output_hidden_states else None,
            attentions=tower.attentions if output_attentions else None,
        )

    # ---- videos ---------------------------------------------------------------------------------------------
    def encode_videos(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        """The family's bridge for clips: the frames' vision features `(V, F, N_v, D_v)` -> each clip's visual tokens
        `(V, P_v, D)`, `P_v = config.num_video_tokens(F)`."""
        raise NotImplementedError(f"{type(self).__name__} has no video path.")

    @can_return_tuple
    def get_video_features(self, pixel_values_videos: torch.FloatTensor, output_hidden_states: bool | None = None,
                           output_attentions: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, num_frames, channels, height, width)`).
            output_hidden_states, output_attentions (`bool`, *optional*): return the vision tower's (over all the
                frames, `(num_videos * num_frames, ...)`); default to its config's, as `get_image_features`.

        Returns:
            [`BaseModelOutputWithPooling`]: `pooler_output` holds each clip's visual tokens, `(num_videos,
            num_video_tokens, hidden_size)`; `last_hidden_state` is the vision tower's, each clip's frames one after
            the other, `(num_videos, num_frames * num_tokens, vision_hidden_size)`.
        """
        if self.config.video_token_id is None:
            raise ValueError(f"This {self.config.model_type} model takes no video: its config has no `video_token_id`.")
        if pixel_values_videos.dim() != 5:
            raise ValueError("`pixel_values_videos` must be (num_videos, num_frames, channels, height, width), got "
                             f"shape {tuple(pixel_values_videos.shape)}.")
        vision_config = self.vision_tower.config
        if output_hidden_states is None:
            output_hidden_states = vision_config.output_hidden_states
        if output_attentions is None:
            output_attentions = vision_config.output_attentions
        V, F = pixel_values_videos.shape[:2]
        features, tower = self.get_vision_features(pixel_values_videos.flatten(0, 1),
                                                   output_attentions=output_attentions)  # (V*F, N_v, D_v)
        tokens = self.encode_videos(features.unflatten(0, (V, F)), **kwargs)  # (V, P_v, D)
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state.unflatten(0, (V, F)).flatten(1, 2),  # (V, F*N, D_v)
            pooler_output=tokens,
            hidden_states=tower.hidden_states if output_hidden_states else None,
            attentions=tower.attentions if output_attentions else None,
        )

    def embed_videos(self, input_ids, inputs_embeds, pixel_values_videos, **kwargs):
        """`inputs_embeds` `(B, T, D)` with each clip's visual tokens at its `video_token_id` positions; returns
        `(inputs_embeds, video_outputs)`."""
        if pixel_values_videos is None:
            if self.training and self.config.video_token_id is not None:  # see `blank_video_tokens`
                inputs_embeds = inputs_embeds + 0.0 * self.blank_video_tokens().sum().to(inputs_embeds.dtype)
            return inputs_embeds, None
        video_outputs = self.get_video_features(pixel_values_videos, return_dict=True, **kwargs)
        video_mask = self.get_placeholder_mask(input_ids, inputs_embeds, token_id=self.config.video_token_id)
        embeds = self.merge_image_features(inputs_embeds, video_mask, video_outputs.pooler_output, kind="video")
        return embeds, video_outputs

    def blank_image_inputs(self) -> dict:
        """One blank image as the image inputs `get_image_features` takes (`pixel_values` `(1, C, S, S)`, S the
        tower's `image_size`)."""
        vision = self.config.vision_config
        weight = next(self.vision_tower.parameters())
        size = vision.image_size
        return {"pixel_values": torch.zeros(1, getattr(vision, "num_channels", 3), size, size, device=weight.device,
                                            dtype=weight.dtype)}

    def blank_image_tokens(self) -> torch.Tensor:
        """
        The visual tokens of a blank image. A training step whose batch holds no image adds them times 0, so that the
        vision tower and the bridge run on every step of every process: under DDP no parameter is left unused, and
        under FSDP or ZeRO-3 a process whose batch is text-only takes part in the same gathers as one whose batch has
        images (otherwise it hangs). The loss is unchanged and the image path's gradients are exactly 0.
        """
        tokens = self.get_image_features(**self.blank_image_inputs(), return_dict=True).pooler_output
        return torch.cat([t.flatten() for t in tokens]) if isinstance(tokens, (list, tuple)) else tokens

    def blank_video_tokens(self) -> torch.Tensor:
        """The visual tokens of a one-frame blank clip. A training step of a model that reads clips whose batch holds
        none adds them times 0, for `blank_image_tokens`' reason: the video path's own parameters (a frame-position
        embedding, a video Q-Former, a newline) take part in every step of every process."""
        inputs = self.blank_image_inputs()
        pixels = inputs.pop("pixel_values")[:, None]  # (1, 1, C, S, S)
        return self.get_video_features(pixels, return_dict=True, **inputs).pooler_output

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor,
                             token_id: int | None = None) -> torch.BoolTensor:
        """The `(B, T)` positions of `token_id` (default `image_token_id`), read off `input_ids` or, without them, off
        `inputs_embeds`."""
        token_id = self.config.image_token_id if token_id is None else token_id
        if input_ids is not None:
            return input_ids == token_id
        embeddings = self.get_input_embeddings()
        if token_id >= embeddings.weight.shape[0]:
            raise ValueError(
                f"The placeholder id {token_id} lies outside the LM's {embeddings.weight.shape[0]} embeddings, so "
                "image and video positions cannot be found in `inputs_embeds`: pass `input_ids` with the pixels."
            )
        token = embeddings(torch.tensor(token_id, device=inputs_embeds.device))  # (D,)
        return (inputs_embeds == token.to(inputs_embeds.dtype)).all(-1)

    def placeholder_ids(self) -> tuple[int, ...]:
        """The ids that stand for visual tokens in the text (`<image>`, and `<video>` for a model that reads clips)."""
        ids = (self.config.image_token_id, self.config.video_token_id)
        return tuple(i for i in ids if i is not None)

    def merge_image_features(
        self, inputs_embeds: torch.Tensor, image_mask: torch.BoolTensor, image_features, kind: str = "image"
    ) -> torch.Tensor:
        """Write `image_features` `(N, P, D)` (or, anyres, one `(P_i, D)` per image) into the `image_mask` `(B, T)`
        positions of `inputs_embeds` `(B, T, D)`; `kind="video"` for clips."""
        plural = "videos" if kind == "video" else "images"
        if isinstance(image_features, (list, tuple)):
            given = f"{len(image_features)} {plural} of {[len(f) for f in image_features]} tokens"
            image_features = torch.cat(list(image_features))  # (sum P_i, D)
        else:
            N, P, D = image_features.shape
            given = f"{N} {plural} x {P} tokens"
        num_features = image_features.numel() // image_features.shape[-1]
        num_placeholders = int(image_mask.sum())
        if num_placeholders != num_features:
            token_id = self.config.video_token_id if kind == "video" else self.config.image_token_id
            raise ValueError(
                f"{kind.capitalize()} features and {kind} tokens do not match: the text holds "
                f"{num_placeholders} {kind} tokens (id {token_id}), the {plural} give {num_features} "
                f"features ({given})."
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).to(inputs_embeds.device), image_features)

    def embed_inputs(self, input_ids, inputs_embeds, pixel_values, **kwargs):
        """Text embeddings with the visual tokens in place; returns `(inputs_embeds, image_outputs)`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            # Placeholder ids may lie outside the LM vocabulary: look up a valid id there, overwritten below.
            placeholders = torch.isin(input_ids, torch.tensor(self.placeholder_ids(), device=input_ids.device))  # (B, T)
            inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))  # (B, T, D)
        if pixel_values is None:
            if self.training:  # see `blank_image_tokens`: every training step runs the image path
                inputs_embeds = inputs_embeds + 0.0 * self.blank_image_tokens().sum().to(inputs_embeds.dtype)
            return inputs_embeds, None
        image_outputs = self.get_image_features(pixel_values, return_dict=True, **kwargs)
        image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        return self.merge_image_features(inputs_embeds, image_mask, image_outputs.pooler_output), image_outputs

    @staticmethod
    def left_padded_positions(attention_mask, length: int):
        """Positions counted from each sample's first real token (left padding), as `generate` counts them."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]  # (B, T)

    @can_return_tuple
    @takes_cache_as_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> FusionModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Text ids; each image occupies as many `image_token_id` positions as it has visual tokens, each clip as
            many `video_token_id` positions.
        pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`, *optional*):
            The images of the whole batch, in the order their placeholders appear (sample by sample).
        pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, num_frames, channels, height, width)`,
            *optional*): the clips of the whole batch, in the order of their placeholders.
        """
        extra = {name: kwargs.pop(name) for name in {*self._image_inputs, *self._video_inputs} if name in kwargs}
        image_inputs = {name: value for name, value in extra.items() if name in self._image_inputs}
        video_inputs = {name: value for name, value in extra.items() if name in self._video_inputs}
        inputs_embeds, image_outputs = self.embed_inputs(input_ids, inputs_embeds, pixel_values, **image_inputs)
        inputs_embeds, video_outputs = self.embed_videos(input_ids, inputs_embeds, pixel_values_videos, **video_inputs)
        if position_ids is None:
            position_ids = self.left_padded_positions(attention_mask, inputs_embeds.shape[1])
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            **cache_kwargs(self.language_model, cache), use_cache=use_cache, return_dict=True, **kwargs,
        )
        return FusionModelOutputWithPast(**outputs, image_outputs=image_outputs, video_outputs=video_outputs)


class FusionForConditionalGeneration(FusionPreTrainedModel):
    r"""
    A family's headless model (`model`) plus the LM's head (`lm_head`). Family classes add `GenerationMixin` and name
    their headless class in `model_class`.

    The head is the LM's own (built to its shape, bias included, or taken from a pretrained causal LM), tied to the
    input embeddings when the LM ties them — whatever the embeddings are called in that LM (`embed_tokens`, GPT-2's
    `wte`, OPT's `decoder.embed_tokens`) — and the logit handling of the LM's head (`LOGIT_HANDLING`) is applied.
    """

    model_class: type[FusionModel] = FusionModel
    _tp_plan = {"lm_head": "colwise_gather_output"}  # tensor parallel: the head as its tied embeddings (Llava's)
    output_class = FusionCausalLMOutputWithPast

    def __init__(self, config: FusionConfig, *, vision_tower=None, language_model=None):
        super().__init__(config)
        check_lm_head(config.text_config)
        lm_head = None
        if language_model is not None and language_model.get_output_embeddings() is not None:
            _mark_initialized(language_model)
            language_model, lm_head = split_causal_lm(language_model)  # a pretrained causal LM brings its head
        self.model = self.model_class(config, vision_tower=vision_tower, language_model=language_model)
        self.lm_head = lm_head if lm_head is not None else build_lm_head(self.config.text_config)
        embeddings = module_name(self.model.language_model, self.model.language_model.get_input_embeddings())
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{embeddings}.weight"}
        self.post_init()

    @property
    def language_model(self):
        return self.model.language_model

    @property
    def vision_tower(self):
        return self.model.vision_tower

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs):
        return self.model.get_image_features(pixel_values, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM head, with the LM's own logit handling (`LOGIT_HANDLING`)."""
        logits = self.lm_head(hidden_states)
        for name, handle in LOGIT_HANDLING.items():
            if (value := getattr(self.config.text_config, name, None)) is not None:
                logits = handle(logits, value)
        return logits

    @can_return_tuple
    @takes_cache_as_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> FusionCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Text ids; each image occupies as many `image_token_id` positions as it has visual tokens, each clip as
            many `video_token_id` positions.
        pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`, *optional*):
            The images of the whole batch, in the order their placeholders appear (sample by sample).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets; `-100`, image and video positions are ignored in the loss.
        pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, num_frames, channels, height, width)`,
            *optional*): the clips of the whole batch, in the order of their placeholders.
        """
        if pixel_values_videos is not None:
            kwargs["pixel_values_videos"] = pixel_values_videos
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs,
        )
        logits = self.compute_logits(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            if input_ids is not None:  # no loss at image or video positions
                placeholders = torch.isin(input_ids, torch.tensor(self.model.placeholder_ids(), device=input_ids.device))
                labels = labels.masked_fill(placeholders.to(labels.device), IGNORE_INDEX)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return self.output_class(loss=loss, logits=logits, **rest)

    def embed_marker_tokens(self) -> None:
        """Grow the LM's embeddings to hold the marker ids the LM itself reads. LLaVA- and BLIP-2-style placeholders
        are replaced by visual tokens before the LM embeds them, so they may lie outside its vocabulary: nothing to
        grow here; the Flamingo-style family overrides it."""

    # ---- training ---------------------------------------------------------------------------------------------
    def bridge_modules(self) -> dict[str, nn.Module]:
        """The parts of the model that are neither backbone: what the family adds and trains."""
        return self.model.bridge_modules()

    def parameter_parts(self) -> dict[str, dict[str, nn.Parameter]]:
        """
        Every parameter by part, as training sets learning rates and freezing: `vision_tower`; `bridge`, the family's
        modules and parameters (Flamingo's gated blocks included, though they live inside the LM's decoder layers);
        `language_model`, the LM's base decoder and its head (a tied head counted once, with the embeddings).
        """
        bridge = {id(p) for module in self.bridge_modules().values() for p in module.parameters()}
        bridge |= {id(getattr(self.model, name)) for name in self.model_class._bridge_parameters
                   if getattr(self.model, name, None) is not None}
        parts = {"vision_tower": {}, "bridge": {}, "language_model": {}}
        for name, parameter in self.named_parameters():
            part = ("bridge" if id(parameter) in bridge
                    else "vision_tower" if name.startswith("model.vision_tower.") else "language_model")
            parts[part][name] = parameter
        return parts

    def freeze_backbones(self, *, train_input_embeddings: bool = False) -> dict[str, int]:
        """
        Freeze the vision tower and the language model (its head too) and train the bridge — the alignment stage of
        LLaVA and BLIP-2 and the Flamingo recipe. Optionally train the LM's input embeddings too (new special tokens).
        Logs and returns the trainable parameter count of each backbone and each bridge part.
        """
        self.requires_grad_(False)
        bridge = self.bridge_modules()
        for module in bridge.values():
            module.requires_grad_(True)
        parameters = {name: getattr(self.model, name) for name in self.model_class._bridge_parameters
                      if getattr(self.model, name, None) is not None}
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        if train_input_embeddings:
            self.get_input_embeddings().requires_grad_(True)
        in_bridge = {id(p) for module in bridge.values() for p in module.parameters()}
        parts = {"vision_tower": self.model.vision_tower, "language_model": self.model.language_model, **bridge}
        report = {
            name: sum(p.numel() for p in module.parameters() if p.requires_grad and (name in bridge or id(p) not in in_bridge))
            for name, module in parts.items()
        }
        report.update({name: parameter.numel() for name, parameter in parameters.items()})
        logger.info("trainable parameters: %s", ", ".join(f"{k}={v:,}" for k, v in report.items()))
        return report

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, after checking that the text fits the language model's positions."""
        self.check_generation_length(args[0] if args else kwargs.get("input_ids"), kwargs)
        return super().generate(*args, **kwargs)

    def _validate_model_kwargs(self, model_kwargs):
        """transformers' check, told about the family's image inputs (`forward` takes them through `**kwargs`)."""
        own = {name: model_kwargs.pop(name) for name in (*self.model_class._image_inputs, *self.model_class._video_inputs)
               if name in model_kwargs}
        try:
            super()._validate_model_kwargs(model_kwargs)
        finally:
            model_kwargs.update(own)

    def check_generation_length(self, input_ids, kwargs) -> None:
        """
        A prompt plus the tokens to generate past the LM's `max_position_embeddings`: an LM with learned position
        embeddings (GPT-2, OPT) has no row for the positions past it, so this raises before generating (GPT-2 would
        die with an `IndexError` midway); a rotary one (Llama, Qwen2) runs on untrained positions, so this warns.
        """
        text = self.config.text_config
        limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if not limit or prompt is None:
            return
        config = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        total = prompt.shape[1] + new if new is not None else kwargs.get("max_length", config.max_length)
        if total <= limit:
            return
        token_embeddings = self.get_input_embeddings()
        learned = any(isinstance(m, nn.Embedding) and m is not token_embeddings for m in self.language_model.modules())
        message = (f"the prompt ({prompt.shape[1]} tokens) and the tokens to generate reach position {total}, past "
                   f"the {limit} positions of the language model ({text.model_type})")
        if learned:
            raise ValueError(f"{message}, whose learned position embeddings end there: shorten the prompt or lower "
                             "`max_new_tokens`.")
        logger.warning_once(f"{message}: it was not trained that far, and its output there may degrade.")

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search / num_return_sequences repeat each sample; its images (and what is given per image, such as
        # anyres `image_sizes`) must follow as a group: [A, B] -> [A, B, A, B].
        per_image = {name: model_kwargs.pop(name) for name in ("pixel_values", *self.model_class._per_image_inputs)
                     if model_kwargs.get(name) is not None}
        pixel_values = per_image.get("pixel_values")
        if pixel_values is not None and expand_size > 1:
            # The placeholders are in `input_ids`, or, generating from `inputs_embeds`, only there.
            ids = input_ids if input_ids is not None and input_ids.shape[1] else None
            image_mask = self.model.get_placeholder_mask(ids, model_kwargs.get("inputs_embeds"))
            tokens = self.model.tokens_per_image(**per_image)
            sizes = self.model.images_per_sample(image_mask, pixel_values.shape[0], tokens)
            per_image = {name: torch.cat([g.repeat(expand_size, *([1] * (g.dim() - 1))) for g in value.split(sizes)])
                         for name, value in per_image.items()}
        videos = model_kwargs.pop("pixel_values_videos", None)
        if videos is not None and expand_size > 1:  # the same for clips: each sample's clips follow it
            ids = input_ids if input_ids is not None and input_ids.shape[1] else None
            video_mask = self.model.get_placeholder_mask(ids, model_kwargs.get("inputs_embeds"),
                                                         token_id=self.config.video_token_id)
            sizes = self.model.images_per_sample(video_mask, videos.shape[0])
            videos = torch.cat([g.repeat(expand_size, *([1] * (g.dim() - 1))) for g in videos.split(sizes)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(per_image)
        if videos is not None:
            model_kwargs["pixel_values_videos"] = videos
        return input_ids, model_kwargs

    # ---- composing from pretrained parts ------------------------------------------------------------------------
    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        *,
        vision_kwargs: dict | None = None,
        text_kwargs: dict | None = None,
        video: bool = False,
        **config_kwargs,
    ):
        """
        Compose a model from a pretrained vision tower and a pretrained causal LM (its base decoder and its head);
        only the bridge is initialised.

        `image_token_id` defaults to the id `<image>` has, or gets when added, in the LM's tokenizer — the id
        `FusionProcessor.from_vision_text_pretrained` gives it — or to the LM vocabulary size if there is no tokenizer.
        `video=True` makes a model that reads clips too: `video_token_id` defaults to the id `<video>` gets after
        `<image>` in the same way.
        """
        vision_tower = load_vision_tower(vision_model_name_or_path, **(vision_kwargs or {}))
        language_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **(text_kwargs or {}))
        config = cls._composed_config(vision_model_name_or_path, text_model_name_or_path, vision_tower.config,
                                      language_model.config, config_kwargs, video)
        return cls(config, vision_tower=vision_tower, language_model=language_model)

    @classmethod
    def config_from_vision_text_pretrained(cls, vision_model_name_or_path: str, text_model_name_or_path: str,
                                           video: bool = False, **config_kwargs):
        """The config `from_vision_text_pretrained` composes, from the two checkpoints' configs alone: no weight is
        read (what `vlm-fusion train` builds its processor from before the data pass)."""
        vision_config = _vision_half(AutoConfig.from_pretrained(vision_model_name_or_path))
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        return cls._composed_config(vision_model_name_or_path, text_model_name_or_path, vision_config, text_config,
                                    config_kwargs, video)

    @classmethod
    def _composed_config(cls, vision_model_name_or_path, text_model_name_or_path, vision_config, text_config,
                         config_kwargs: dict, video: bool = False):
        config_kwargs = dict(config_kwargs)
        if "image_token_id" not in config_kwargs:
            config_kwargs["image_token_id"] = _default_placeholder_ids(text_model_name_or_path, text_config)[0]
        if video and config_kwargs.get("video_token_id") is None:
            config_kwargs["video_token_id"] = _default_placeholder_ids(text_model_name_or_path, text_config)[1]
        config_kwargs.setdefault(
            "origin", f"Composed from the pretrained vision tower `{vision_model_name_or_path}` and language model "
            f"`{text_model_name_or_path}`; only the bridge was initialised."
        )
        hub_ids = [p for p in (vision_model_name_or_path, text_model_name_or_path) if not os.path.exists(p)]
        config_kwargs.setdefault("base_models", hub_ids or None)
        return cls.config_class(vision_config=vision_config, text_config=text_config, **config_kwargs)


def _default_placeholder_ids(text_model_name_or_path, text_config) -> tuple[int, int]:
    """The ids `<image>` and then `<video>` have, or get when added, in the LM's tokenizer (the processor adds them in
    that order); past the LM vocabulary where there is no tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
    except (OSError, ValueError):
        return text_config.vocab_size, text_config.vocab_size + 1
    return add_special_token(tokenizer, "<image>"), add_special_token(tokenizer, "<video>")
