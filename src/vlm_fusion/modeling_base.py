"""What every vlm-fusion model shares: the two backbones, the image-token splice, and generation plumbing.

A family subclass owns only its bridge (`get_image_features`); this base owns
`vision_tower` (any transformers vision model) and `language_model` (the whole `AutoModelForCausalLM`, so tied
embeddings and LM-specific heads keep working).

Legend: B batch, T text positions, N images (all samples together), P visual tokens per image, D LM width.
"""

import copy
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import logging
from transformers.modeling_outputs import ModelOutput

from .configuration_base import FusionConfig
from .vision import build_vision_tower, load_vision_tower, select_image_features

IGNORE_INDEX = -100
logger = logging.get_logger(__name__)


@dataclass
class FusionCausalLMOutputWithPast(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*): next-token loss, image positions ignored.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
    past_key_values (`Cache`, *optional*): the language model's KV cache.
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, num_tokens, hidden_size)`, *optional*):
        the visual tokens handed to the language model, when images were encoded in this call.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@contextmanager
def registered_for_auto_classes(model=None, processor=None):
    """Register the classes for remote-code saving for the duration of one save (transformers keys off the class)."""
    targets = []
    if model is not None:
        targets += [(type(model.config), "AutoConfig"), (type(model), "AutoModelForImageTextToText")]
    if processor is not None:
        targets.append((type(processor), "AutoProcessor"))
    previous = [cls.__dict__.get("_auto_class") for cls, _ in targets]
    for cls, auto_class in targets:
        cls._auto_class = auto_class
    try:
        yield
    finally:
        for (cls, _), value in zip(targets, previous):
            if value is None:
                del cls._auto_class
            else:
                cls._auto_class = value


def _remember_4bit_absmax(model: torch.nn.Module) -> None:
    """Keep each 4-bit weight's absmax as loaded (see `_restore_portable_4bit_layout`)."""
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is not None and not getattr(quant_state, "packing_format_for_cpu", False):
            module._loaded_absmax = quant_state.absmax.clone()


def _restore_portable_4bit_layout(model: torch.nn.Module) -> None:
    """
    bitsandbytes (0.50) repacks a 4-bit weight in place for its CPU kernels on the first forward, rounding its
    absmax to bf16, and transformers' `save_pretrained` writes the weight as it finds it: a model saved after
    inference reloaded as another model. Undo the packing and put back the absmax it was loaded with, so the
    saved checkpoint is the loaded quantization; the next forward packs again.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            if hasattr(module, "_loaded_absmax"):
                weight.quant_state.absmax = module._loaded_absmax.clone()


def _mark_initialized(module: torch.nn.Module) -> None:
    """Keep `post_init` from re-initialising a pretrained part handed to the constructor."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in list(module.parameters()) + list(module.buffers()):
        tensor._is_hf_initialized = True


class FusionPreTrainedModel(PreTrainedModel):
    """Base of the family models, which add `GenerationMixin` themselves (transformers looks for it among direct bases)."""

    config_class = FusionConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    # Modules 4-bit/8-bit loading leaves in full precision (name patterns, matched from the start of module names
    # by transformers): the vision tower, the bridge (each family adds its parts) and the LM head.
    _unquantized_modules = ["vision_tower", "language_model.lm_head"]

    def __init__(self, config: FusionConfig, *, vision_tower=None, language_model=None):
        super().__init__(config)
        if vision_tower is not None:
            _mark_initialized(vision_tower)
        if language_model is not None:
            _mark_initialized(language_model)
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        self.language_model = (
            language_model
            if language_model is not None
            else AutoModelForCausalLM.from_config(config.text_config, attn_implementation=config._attn_implementation)
        )
        # One config object for the LM, so `resize_token_embeddings` and friends keep `config.text_config` current.
        self.config.text_config = self.language_model.config
        self.config.vision_config = self.vision_tower.config
        self._lm_forward_params = set(inspect.signature(self.language_model.forward).parameters)

    # ---- the language model's embeddings are the model's embeddings ---------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.text_config = self.language_model.config
        return embeddings

    # ---- the family's bridge --------------------------------------------------------------------------------------
    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """The tower's `vision_feature_layer` features, `(num_images, num_tokens, vision_hidden_size)`."""
        return select_image_features(
            self.vision_tower,
            pixel_values,
            layer=self.config.vision_feature_layer,
            strategy=self.config.vision_feature_select_strategy,
        )

    def get_image_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`).

        Returns:
            `torch.FloatTensor` of shape `(num_images, num_tokens, hidden_size)`: the visual tokens in LM width.
        """
        raise NotImplementedError

    # ---- splicing visual tokens into the text sequence ----------------------------------------------------------
    def merge_image_features(
        self, inputs_embeds: torch.Tensor, image_mask: torch.BoolTensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Write `image_features` `(N, P, D)` into the `image_mask` `(B, T)` positions of `inputs_embeds` `(B, T, D)`."""
        N, P, D = image_features.shape
        num_placeholders = int(image_mask.sum())
        if num_placeholders != N * P:
            raise ValueError(
                "Image features and image tokens do not match: the text holds "
                f"{num_placeholders} image tokens (id {self.config.image_token_id}), the images give {N * P} features "
                f"({N} images x {P} tokens)."
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1).to(inputs_embeds.device), image_features)

    def embed_inputs(self, input_ids, inputs_embeds, pixel_values, past_key_values):
        """Text embeddings with the visual tokens in place; returns `(inputs_embeds, image_mask, image_features)`."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is None:
            if pixel_values is not None:
                raise ValueError("`pixel_values` need `input_ids`: the image positions are found by `image_token_id`.")
            return inputs_embeds, None, None
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        # Placeholder ids may lie outside the LM vocabulary: look up a valid id there, overwritten below.
        inputs_embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)  # (N, P, D)
            inputs_embeds = self.merge_image_features(inputs_embeds, image_mask, image_features)
        elif (past_key_values is None or past_key_values.get_seq_length() == 0) and image_mask.any():
            raise ValueError(
                f"`input_ids` hold {int(image_mask.sum())} image tokens (id {self.config.image_token_id}) "
                "but no `pixel_values` were given."
            )
        return inputs_embeds, image_mask, image_features

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> FusionCausalLMOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Text ids; each image occupies as many `image_token_id` positions as it has visual tokens.
        pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`, *optional*):
            The images of the whole batch, in the order their placeholders appear (sample by sample).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets; `-100` and image positions are ignored in the loss.
        """
        inputs_embeds, image_mask, image_features = self.embed_inputs(
            input_ids, inputs_embeds, pixel_values, past_key_values
        )
        outputs = self.run_language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, labels=labels, ignore_mask=image_mask, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )
        return FusionCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )

    def run_language_model(self, *, attention_mask=None, position_ids=None, labels=None, ignore_mask=None,
                           logits_to_keep=0, **kwargs):
        """
        Call the wrapped LM with `input_ids` or `inputs_embeds` (in `kwargs`). Positions count from each sample's
        first unpadded token when no `position_ids` are given; `labels` are ignored where `ignore_mask` is set.
        """
        length = (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Left padding: count positions from each sample's first real token, as `generate` does.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        if labels is not None and ignore_mask is not None:
            labels = labels.masked_fill(ignore_mask.to(labels.device), IGNORE_INDEX)
        if logits_to_keep and "logits_to_keep" in self._lm_forward_params:
            kwargs["logits_to_keep"] = logits_to_keep
        kwargs["return_dict"] = True
        return self.language_model(attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)

    # ---- training ---------------------------------------------------------------------------------------------
    def bridge_modules(self) -> dict[str, torch.nn.Module]:
        """The parts of the model that are neither backbone: what the family adds and trains."""
        return {name: m for name, m in self.named_children() if name not in ("vision_tower", "language_model")}

    def freeze_backbones(self, *, train_input_embeddings: bool = False) -> dict[str, int]:
        """
        Freeze the vision tower and the language model and train the bridge — the alignment stage of LLaVA and
        BLIP-2 and the Flamingo recipe. Optionally train the LM's input embeddings too (new special tokens).
        Logs and returns the trainable parameter count of each backbone and each bridge part.
        """
        self.vision_tower.requires_grad_(False)
        self.language_model.requires_grad_(False)
        bridge = self.bridge_modules()
        for module in bridge.values():
            module.requires_grad_(True)
        if train_input_embeddings:
            self.get_input_embeddings().requires_grad_(True)
        in_bridge = {id(p) for module in bridge.values() for p in module.parameters()}
        parts = {"vision_tower": self.vision_tower, "language_model": self.language_model, **bridge}
        report = {
            name: sum(p.numel() for p in module.parameters() if p.requires_grad and (name in bridge or id(p) not in in_bridge))
            for name, module in parts.items()
        }
        logger.info("trainable parameters: %s", ", ".join(f"{k}={v:,}" for k, v in report.items()))
        return report

    # ---- generation ---------------------------------------------------------------------------------------------
    def images_per_sample(self, input_ids: torch.LongTensor, num_images: int) -> list[int]:
        """How many of the batch's `num_images` images belong to each sample, from its placeholder count."""
        counts = (input_ids == self.config.image_token_id).sum(-1)  # (B,)
        total = int(counts.sum())
        if num_images == 0 or total % num_images:
            raise ValueError(f"{total} image tokens cannot be shared evenly among {num_images} images.")
        return (counts // (total // num_images)).tolist()

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search / num_return_sequences repeat each sample; its images must follow as a group: [A, B] -> [A, B, A, B].
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            groups = pixel_values.split(self.images_per_sample(input_ids, pixel_values.shape[0]))
            pixel_values = torch.cat([g.repeat(expand_size, *([1] * (g.dim() - 1))) for g in groups])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
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
        **config_kwargs,
    ):
        """
        Compose a model from a pretrained vision tower and a pretrained causal LM; only the bridge is initialised.

        `image_token_id` defaults to the id `<image>` has, or gets when added, in the LM's tokenizer — the id
        `FusionProcessor.from_vision_text_pretrained` gives it — or to the LM vocabulary size if there is no tokenizer.
        """
        vision_tower = load_vision_tower(vision_model_name_or_path, **(vision_kwargs or {}))
        language_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **(text_kwargs or {}))
        if "image_token_id" not in config_kwargs:
            config_kwargs["image_token_id"] = _default_image_token_id(text_model_name_or_path, language_model.config)
        config_kwargs.setdefault(
            "origin", f"Composed from the pretrained vision tower `{vision_model_name_or_path}` and language model "
            f"`{text_model_name_or_path}`; only the bridge was initialised."
        )
        hub_ids = [p for p in (vision_model_name_or_path, text_model_name_or_path) if not os.path.exists(p)]
        config_kwargs.setdefault("base_models", hub_ids or None)
        config = cls.config_class(vision_config=vision_tower.config, text_config=language_model.config, **config_kwargs)
        return cls(config, vision_tower=vision_tower, language_model=language_model)

    # ---- loading, saving, publishing ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a `quantization_config` keeps the family's `_unquantized_modules`."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = cls.with_unquantized_defaults(kwargs["quantization_config"])
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _remember_4bit_absmax(model)
        return model

    @classmethod
    def with_unquantized_defaults(cls, quantization_config):
        """A copy of `quantization_config` whose skip list also holds the family's `_unquantized_modules`."""
        config = copy.deepcopy(quantization_config)
        if not hasattr(config, "llm_int8_skip_modules"):
            return config
        user = list(config.llm_int8_skip_modules or [])
        added = [m for m in cls._unquantized_modules if m not in user]
        if user and added:
            logger.warning(
                "vlm-fusion keeps %s unquantized in addition to your `llm_int8_skip_modules` %s (transformers would "
                "otherwise drop its own lm_head exemption and quantize the vision tower and the bridge).", added, user
            )
        config.llm_int8_skip_modules = user + added
        return config

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, repo_id: str | None = None,
                        tags=(), **kwargs):
        """
        `PreTrainedModel.save_pretrained`, plus a model card (`README.md`) rendered from the family's template.
        `remote_code=True` also writes the model's code beside the weights, so that `trust_remote_code=True`
        loads it where vlm-fusion is not installed.
        """
        _restore_portable_4bit_layout(self)
        with registered_for_auto_classes(self if remote_code else None):
            result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            try:
                from vlm_fusion.tools.hub import write_model_card
            except ImportError:  # exported code, running without vlm-fusion installed
                return result
            tags = [*(self.model_tags or []), *tags]
            write_model_card(self, save_directory, repo_id=repo_id, tags=tags, remote_code=remote_code)
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token=None, revision: str | None = None, create_pr: bool = False,
                    commit_description: str | None = None, tags=(), remote_code: bool = False,
                    max_shard_size="50GB"):
        """Upload what `save_pretrained` writes — weights, config, model card, and the code if `remote_code`."""
        import tempfile

        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size, remote_code=remote_code, repo_id=repo_id,
                                 tags=tags)
            return self._upload_modified_files(
                tmp, repo_id, files_timestamps={}, commit_message=commit_message or "Upload model", token=token,
                create_pr=create_pr, revision=revision, commit_description=commit_description,
            )


def _default_image_token_id(text_model_name_or_path, text_config) -> int:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
    except (OSError, ValueError):
        return text_config.vocab_size
    from .processing_fusion import add_special_token

    return add_special_token(tokenizer, "<image>")
