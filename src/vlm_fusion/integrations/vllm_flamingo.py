"""The Flamingo-style family on vLLM, natively (imported by vLLM only, through `vlm_fusion.integrations.vllm.register`).

vLLM serves it as it serves Whisper, an encoder-decoder model:

    encoder  pixels -> vision tower -> perceiver resampler -> (L, D_v) latents per media     (`embed_multimodal`)
    decoder  the LM as vLLM serves it (its native class, or its Transformers backend), each gated block in front of its
             decoder layer (a forward pre-hook, as in `FusionFlamingoModel`), the block's cross-attention a vLLM
             `CrossAttention`: its keys/values over the latents are written into the paged cross-attention cache once,
             at the request's first step, and read at every later step.

The prompt is the decoder's prompt exactly as the processor writes it (BOS and one `<image>` token per image, one
`<video>` token per clip); the encoder prompt is `L` placeholders per media, where vLLM counts the latents. A clip is
one media, as in Flamingo: its frames (sampled by the model's video processor, as in transformers) each get their time
embedding and the same latents read them all (`flatten_frames`). A token attends to the latents when an `<image>` or
`<video>` token is at or before it in its request (`only_attend_immediate_media` changes nothing with one media);
tokens before it, and every token of a request without media, get zero cross-attention output, as in transformers.

Bounds (each refused in one line, not served approximately):
- one media per prompt (an image or a clip): vLLM 0.32 keeps an encoder-decoder request's encoder inputs at the start
  of the encoder sequence and asserts so once decoding begins (`Scheduler._try_schedule_encoder_inputs`: "Encoder input
  should be processed at the beginning of the sequence"), and its cross-attention lets every token of a request see all
  of the request's encoder tokens (`CrossAttentionBuilder` sets `causal=False`, `seq_lens` = the whole encoder length),
  so "each token sees only the media just before it" has no place to live in the kernel's inputs;
- a generated `<image>` (or `<video>`) token is banned (its logit is -inf, as TGI did for IDEFICS): it would open a
  new media chunk without media, which vLLM keeps no per-request state to notice at later steps;
- eager execution only (`enforce_eager=True` / `--enforce-eager`): the gated blocks read per-step state (which tokens
  see an image, this step's latents) that a compiled graph would freeze;
- no tensor or pipeline parallelism (the gated blocks and the tower are plain `nn.Linear`s beside the LM's layers).

Legend: T tokens of the step (all requests, flat), R requests of the step, S latents of the step's images (flat), L
latents per image, D LM width, D_v vision width, H heads, d head width.
"""

import inspect
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.exceptions import VLLMValidationError
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import CrossAttention
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import init_vllm_registered_model
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

from ..configuration_flamingo import FusionFlamingoConfig
from ..language_model import causal_lm_class
from ..modeling_flamingo import build_gated_block, build_perceiver, find_decoder_layers
from ..vision import build_vision_tower, select_image_features

ONE_IMAGE = (
    "Flamingo-style models (fusion_flamingo) take one image per prompt on vLLM 0.32 (or one clip instead: a clip is "
    "one media): its encoder-decoder path "
    "attends every token of a request to all of the request's encoder tokens, so text cannot be kept to the image "
    "just before it; generate with transformers for several images or clips."
)
ONE_KIND = (
    "Flamingo-style models (fusion_flamingo) serve images or clips on vLLM 0.32, one kind per engine: its scheduler "
    "takes an encoder-decoder model with one modality (Scheduler.__init__); start the engine with "
    "limit_mm_per_prompt={\"image\": 0, \"video\": 1} (--limit-mm-per-prompt) to serve clips, with no video limit "
    "to serve images."
)


def asked_limits(mm_config) -> dict[str, bool]:
    """Which of images and clips the engine was started with a limit above 0 for."""
    return {modality: mm_config.limit_per_prompt.get(modality) is not None
            and mm_config.get_limit_per_prompt(modality) > 0 for modality in ("image", "video")}


def serves_clips(mm_config) -> bool:
    """vLLM 0.32 takes one modality for an encoder-decoder model (`ONE_KIND`): an engine serves images, or clips when it
    was started with a video limit above 0 and no image limit above 0."""
    asked = asked_limits(mm_config)
    return asked["video"] and not asked["image"]


# ---- processing info, dummy inputs, multimodal processor ------------------------------------------------------------
class FlamingoProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> FusionFlamingoConfig:
        return self.ctx.get_hf_config()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        """Images, or clips when the engine was started for them (see `serves_clips`)."""
        return {"video": 1} if serves_clips(self.ctx.get_mm_config()) else {"image": 1}

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if num_items and modality in ("image", "video") and modality not in self.get_supported_mm_limits():
            raise VLLMValidationError(ONE_KIND, parameter=modality)
        if modality in ("image", "video") and num_items > 1:
            raise VLLMValidationError(ONE_IMAGE, parameter=modality)
        super().validate_num_items(modality, num_items)

    def get_data_parser(self) -> MultiModalDataParser:
        """Clips come with their metadata when the video processor samples frames (as transformers' processors do)."""
        return MultiModalDataParser(video_needs_metadata=self.samples_frames(),
                                    expected_hidden_size=self._get_expected_hidden_size(),
                                    allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)

    def samples_frames(self) -> bool:
        video_processor = getattr(self.get_hf_processor(), "video_processor", None)
        return bool(getattr(video_processor, "do_sample_frames", False))

    def get_num_image_tokens(self) -> int:
        """Encoder tokens a media (an image or a clip) takes: its latents."""
        return self.get_hf_config().num_latents

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return dict.fromkeys(self.get_supported_mm_limits(), self.get_num_image_tokens())

    def image_size(self) -> int:
        return self.get_hf_config().vision_config.image_size


class FlamingoDummyInputsBuilder(BaseDummyInputsBuilder[FlamingoProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<image>" * mm_counts.get("image", 0) + "<video>" * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int],
                          mm_options: MultiModalDummyOptions | None = None):
        size = self.info.image_size()
        data = {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=(mm_options or {}).get("image"))}
        if mm_counts.get("video", 0):  # the longest clip the time embeddings allow, every frame kept
            frames = self.info.get_hf_config().max_num_frames
            videos = self._get_dummy_videos(width=size, height=size, num_frames=frames,
                                            num_videos=mm_counts["video"], overrides=(mm_options or {}).get("video"))
            if self.info.samples_frames():
                videos = [(video, {"total_num_frames": len(video), "do_sample_frames": False}) for video in videos]
            data["video"] = videos
        return data


class FlamingoMultiModalProcessor(EncDecMultiModalProcessor[FlamingoProcessingInfo]):
    """The decoder prompt is the prompt as given (no decoder start token added); the encoder prompt holds `L`
    placeholders per image, at offset 0 (see the module's bounds)."""

    skip_decoder_start_token = True

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        config = self.info.get_hf_config()
        counts = {modality: mm_items.get_count(modality, strict=False) for modality in ("image", "video")}
        encoder_prompt = []
        for (modality, count), (kind, token_id) in zip(counts.items(), (("Image", config.image_token_id),
                                                                          ("Video", config.video_token_id))):
            if isinstance(prompt, list) and count and prompt.count(token_id) != count:
                raise VLLMValidationError(
                    f"{kind} tokens and {modality}s do not match: the prompt holds {prompt.count(token_id)} "
                    f"{modality} tokens (id {token_id}), {count} {modality}s were given.", parameter=modality)
            encoder_prompt += [token_id] * count
        return encoder_prompt

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor(**hf_kwargs)
        out = {}
        if hf_data.get("images"):
            processed = processor.image_processor(images=hf_data["images"], return_tensors="pt")
            if not hasattr(processed, "keys"):  # IDEFICS' image processor returns the pixel tensor itself
                processed = {"pixel_values": processed}
            out["pixel_values"] = processed["pixel_values"]
        if hf_data.get("videos"):  # frames sampled as transformers samples them (the clip's metadata, when it samples)
            videos, sampling = list(hf_data["videos"]), {}
            if self.info.samples_frames():
                videos, metadata = zip(*videos)
                sampling = dict(video_metadata=list(metadata),
                                do_sample_frames=all(m.get("do_sample_frames", True) for m in metadata))
            out["pixel_values_videos"] = processor.video_processor(list(videos), return_tensors="pt",
                                                                   **sampling)["pixel_values_videos"]
        return BatchFeature(out)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        return dict(pixel_values=MultiModalFieldConfig.batched("image"),
                    pixel_values_videos=MultiModalFieldConfig.batched("video"))

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        latents = self.info.get_num_image_tokens()
        return [PromptReplacement(modality=modality, target=[token_id], replacement=[token_id] * latents)
                for modality, token_id in (("image", config.image_token_id), ("video", config.video_token_id))
                if token_id is not None]


# ---- the model ------------------------------------------------------------------------------------------------------
def causal_lm_architecture(text_config) -> tuple[str, str]:
    """The LM's causal-LM class name (what vLLM serves, natively or through its Transformers backend) and the prefix
    its checkpoint puts before the base model's weights (`model` for Llama and OPT, `transformer` for GPT-2)."""
    causal_lm = causal_lm_class(text_config)
    return causal_lm.__name__, causal_lm.base_model_prefix


@MULTIMODAL_REGISTRY.register_processor(FlamingoMultiModalProcessor, info=FlamingoProcessingInfo,
                                        dummy_inputs=FlamingoDummyInputsBuilder)
class FusionFlamingoForVLLM(nn.Module, SupportsMultiModal):
    """`FusionFlamingoForConditionalGeneration` on vLLM: same checkpoint, same greedy tokens (see the module)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError("Flamingo-style models take images and clips only.")

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.config import CompilationMode

        config = vllm_config.model_config.hf_config
        if vllm_config.compilation_config.mode != CompilationMode.NONE:
            raise ValueError("Flamingo-style models (fusion_flamingo) run eagerly on vLLM: pass enforce_eager=True "
                             "(`--enforce-eager`); the gated blocks read per-step state a compiled graph would freeze.")
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError("Flamingo-style models (fusion_flamingo) are served without tensor or pipeline "
                             "parallelism on vLLM (tensor_parallel_size=1, pipeline_parallel_size=1).")
        asked = asked_limits(vllm_config.model_config.get_multimodal_config())
        if asked["video"] and asked["image"]:  # before vLLM's scheduler asserts it
            raise ValueError(ONE_KIND)
        if asked["video"] and config.video_token_id is None:
            raise ValueError("This Flamingo-style model reads no clips (its config has no video_token_id): serve it "
                             "without a video limit.")
        self.config = config
        text_config = config.get_text_config()
        architecture, self.lm_prefix = causal_lm_architecture(text_config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.perceiver = build_perceiver(config)
        self.language_model = init_vllm_registered_model(vllm_config, hf_config=text_config,
                                                         prefix=f"{prefix}language_model",
                                                         architectures=[architecture])
        self.gated_cross_attn_layers = nn.ModuleDict()
        self.cross_attention = nn.ModuleDict()
        _, decoder_layers = find_decoder_layers(self.language_model)
        for index in config.gated_layer_indices():
            self.gated_cross_attn_layers[str(index)] = build_gated_block(config)  # its weights: the checkpoint's
            self.cross_attention[str(index)] = CrossAttention(
                num_heads=config.cross_attention_heads, head_size=config.cross_attention_head_dim,
                scale=config.cross_attention_head_dim ** -0.5, cache_config=vllm_config.cache_config,
                prefix=f"{prefix}cross_attention.{index}",
            )
            decoder_layers[index].register_forward_pre_hook(self._gated_pre_hook(str(index)), with_kwargs=True)
        self._step = None  # (has_media (T,), media (S, D_v) or None) of the running forward

    # ---- encoder ----------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs) -> MultiModalEmbeddings:
        """Each image's or clip's latents `(L, D_v)`: the encoder outputs vLLM hands to `forward` at the request's
        first step (vLLM calls this once per modality)."""
        latents = []
        for name in ("pixel_values", "pixel_values_videos"):
            pixels = kwargs.get(name)
            if pixels is None:
                continue
            if isinstance(pixels, (list, tuple)):
                pixels = torch.stack(list(pixels))
            frames = pixels.flatten(0, 1) if name == "pixel_values_videos" else pixels  # clips: (N*F, C, H, W)
            features, _ = select_image_features(self.vision_tower, frames, layer=self.config.vision_feature_layer,
                                                strategy=self.config.vision_feature_select_strategy)  # (N[*F], V, D_v)
            if name == "pixel_values_videos":  # each clip one media (the resampler adds the frames' time embeddings)
                features = features.unflatten(0, pixels.shape[:2])  # (N, F, V, D_v)
            media_index = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)  # one media each
            latents += self.perceiver(features.to(self.perceiver.latents.dtype), media_index).unbind(0)  # (L, D_v)
        return latents

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None):
        return self.language_model.embed_input_ids(input_ids)

    # ---- which tokens see an image ----------------------------------------------------------------------------
    def _has_media(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.BoolTensor:
        """`(T,)`: the token's request has an image and an `<image>` token is at or before it. Chunked prefill and
        prefix caching are off for encoder-decoder models, so a request's step either starts at position 0 (its whole
        prompt) or continues after it (decoding: the prompt's `<image>` is behind)."""
        has_media = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or not self.cross_attention:
            return has_media  # a profiling or warm-up step
        metadata = metadata.get(next(iter(self.cross_attention.values())).layer_name)
        if metadata is None:
            return has_media
        starts = metadata.query_start_loc.to(input_ids.device)  # (R + 1,)
        encoder_lengths = metadata.seq_lens.to(input_ids.device)  # (R,) the requests' latents (0: no image)
        counts = starts.diff()  # (R,)
        T = int(starts[-1])
        request = torch.repeat_interleave(torch.arange(len(counts), device=input_ids.device), counts)  # (T,)
        is_image = self.is_media_token(input_ids[:T]).long()
        seen = is_image.cumsum(0)
        seen = seen - (seen - is_image)[starts[:-1].clamp(max=max(T - 1, 0))][request]  # (T,) within the request
        decoding = positions[starts[:-1].clamp(max=max(T - 1, 0))] > 0  # (R,)
        has_media[:T] = (encoder_lengths[request] > 0) & (decoding[request] | (seen > 0))
        return has_media

    def is_media_token(self, input_ids: torch.Tensor) -> torch.BoolTensor:
        """`<image>` or `<video>`: a media marker."""
        return torch.isin(input_ids, torch.tensor(self.media_token_ids(), device=input_ids.device))

    def media_token_ids(self) -> list[int]:
        return [i for i in (self.config.image_token_id, self.config.video_token_id) if i is not None]

    # ---- the gated blocks, in front of their decoder layers ---------------------------------------------------
    def _gated_pre_hook(self, index: str):
        def hook(layer, args, kwargs):
            bound = inspect.signature(layer.forward).bind(*args, **kwargs)
            x = bound.arguments["hidden_states"]  # (T, D)
            residual = bound.arguments.get("residual")
            if residual is not None:  # vLLM's layers carry the residual stream apart: x is their sum
                x = x + residual
                bound.arguments["residual"] = None
            bound.arguments["hidden_states"] = self._gated_block(index, x)
            return bound.args, bound.kwargs

        return hook

    def _gated_block(self, index: str, x: torch.Tensor) -> torch.Tensor:
        """`GatedCrossAttentionBlock.forward` on `(T, D)`, its attention through vLLM's cross-attention cache."""
        block = self.gated_cross_attn_layers[index]
        has_media, media = self._step if self._step is not None else (None, None)
        if has_media is not None and (media is not None or bool(has_media.any())):
            attn = block.attn
            q = attn.to_q(attn.norm(x))  # (T, H*d)
            k = v = None
            if media is not None:  # the request's first step: written into the cross-attention cache
                k, v = attn.to_kv(media).chunk(2, dim=-1)  # (S, H*d) each
            out = self.cross_attention[index](q, k, v)  # (T, H*d)
            out = out.masked_fill(~has_media[:, None], 0.0)  # no image before the token: nothing
            x = attn.to_out(out) * block.attn_gate.tanh().view(-1) + x
        return block.ff(x) * block.ff_gate.tanh().view(-1) + x

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds=None, encoder_outputs: list[torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        media = torch.cat(encoder_outputs, dim=0) if encoder_outputs else None  # (S, D_v)
        self._step = (self._has_media(input_ids, positions), media)
        try:
            return self.language_model(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            self._step = None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            for token_id in self.media_token_ids():
                if token_id < logits.shape[-1]:
                    logits[..., token_id] = float("-inf")  # see the module's bounds
        return logits

    # ---- weights ----------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Our checkpoint's names: `model.vision_tower.*`, `model.perceiver.*`, the LM's base model under
        `model.language_model.*` with each gated block at `layers.{i}.gated_cross_attn_layer.*`, and `lm_head.*`."""
        params = dict(self.named_parameters())
        loaded = set()

        def lm_weights():
            for name, tensor in weights:
                own = None
                if name.startswith(("model.vision_tower.", "model.perceiver.")):
                    own = name[len("model."):]
                elif ".gated_cross_attn_layer." in name and name.startswith("model.language_model."):
                    layer_path, rest = name[len("model.language_model."):].split(".gated_cross_attn_layer.")
                    own = f"gated_cross_attn_layers.{layer_path.rsplit('.', 1)[-1]}.{rest}"
                if own is not None:
                    if own not in params:
                        raise ValueError(f"The checkpoint's {name} has no place in the vLLM model ({own}).")
                    param = params[own]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                    loaded.add(own)
                elif name.startswith("model.language_model."):
                    yield f"{self.lm_prefix}.{name[len('model.language_model.'):]}", tensor
                else:  # lm_head.*
                    yield name, tensor

        loaded |= {f"language_model.{name}" for name in self.language_model.load_weights(lm_weights())}
        return loaded
