"""The Flamingo-style family: a perceiver resampler and tanh-gated cross-attention blocks inside any causal LM.

    latents = Resampler(image features)                         (L learned latents attend to cat(media, latents))
    latents = Resampler(flatten_frames(frames' features + time embeddings))        (a clip: all its frames at once)
    x = x + tanh(attn_gate) * XAttn(LN(x), latents of the media at or before each token)
    x = x + tanh(ff_gate)   * FFN(LN(x))                        (both gates start at exactly 0)

The LM is not forked and none of its weights is renamed: each gated block is added to the decoder layer it precedes
as `gated_cross_attn_layer` (OpenFlamingo's name) and runs from a forward pre-hook on that layer — the one
documented contact with the LM's internals. Living inside the layer, a block lands on the layer's device under
any device map.
The text keeps one `<image>` token per image and one `<video>` token per clip (a clip is one media, as in
Flamingo); a token attends to the latents of the latest media at or before it (all earlier ones with
`only_attend_immediate_media=False`), and tokens before the first media get zero cross-attention output. While
decoding, the vision tower and resampler ran once at prefill and each block's keys and values over the latents are
computed once and reused (`MediaCache`).

Legend: B batch, T text positions, N media (images and clips, whole batch), M most media of one sample, L latents
per media, V vision tokens per image, F frames per clip, D_v vision width, D LM width, H heads, d head width.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init
from transformers.utils.generic import can_return_tuple

from .compat import cache_kwargs, is_activation_checkpointing, takes_cache_as_past_key_values
from .configuration_flamingo import FusionFlamingoConfig
from .modeling_base import (
    FusionCausalLMOutputWithPast,
    FusionForConditionalGeneration,
    FusionModel,
    FusionModelOutputWithPast,
)


def feed_forward(dim: int, mult: int, activation: str = "gelu") -> nn.Sequential:
    act = nn.GELU() if activation == "gelu" else nn.ReLU()
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), act,
                         nn.Linear(dim * mult, dim, bias=False))


class SwiGLUFeedForward(nn.Module):
    """IDEFICS's gated-block feed-forward: RMSNorm, then down(act(gate(x)) * up(x)) at the LM's own width."""

    def __init__(self, *, dim: int, hidden_dim: int, act: str, eps: float):
        super().__init__()
        from transformers.activations import ACT2FN

        self.norm = nn.RMSNorm(dim, eps=eps)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, S, _ = x.shape
    return x.view(B, S, heads, -1).transpose(1, 2)  # (B, S, H*d) -> (B, H, S, d)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, S, d = x.shape
    return x.transpose(1, 2).reshape(B, S, H * d)  # (B, H, S, d) -> (B, S, H*d)


def find_decoder_layers(language_model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The LM's decoder layers: its outermost `nn.ModuleList` with one entry per hidden layer."""
    num_layers = language_model.config.num_hidden_layers
    candidates = [(name, module) for name, module in language_model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == num_layers and name]
    if not candidates:
        raise ValueError(
            f"Cannot find the decoder layers of {type(language_model).__name__}: it has no nn.ModuleList of its "
            f"{num_layers} layers."
        )
    return min(candidates, key=lambda candidate: candidate[0].count("."))


def flatten_frames(frames: torch.Tensor, frame_embs: torch.Tensor) -> torch.Tensor:
    """
    Flamingo's video: clips' frame features `(num_clips, num_frames, V, D_v)` become one media each, `(num_clips,
    num_frames * V, D_v)`, every frame's tokens plus the learned time embedding of its position (`frame_embs`
    `(max_num_frames, D_v)`), so the same latents read the whole clip (flamingo-pytorch's `media_pos_emb`).
    """
    num_frames = frames.shape[1]
    if num_frames > frame_embs.shape[0]:
        raise ValueError(f"A clip has {num_frames} frames, more than `max_num_frames` ({frame_embs.shape[0]}).")
    return (frames + frame_embs[:num_frames, None]).flatten(1, 2)  # (N, F, V, D_v) + (F, 1, D_v) -> (N, F*V, D_v)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)  # (N, V, D_v), (N, L, D_v)
        q = split_heads(self.to_q(latents), self.heads)  # (N, H, L, d)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # (N, V + L, H*d) each
        out = F.scaled_dot_product_attention(q, split_heads(k, self.heads), split_heads(v, self.heads))
        return self.to_out(merge_heads(out))  # (N, L, D_v)


class PerceiverLayer(nn.Module):
    def __init__(self, *, dim: int, heads: int, dim_head: int, ff_mult: int, activation: str = "gelu"):
        super().__init__()
        self.attn = PerceiverAttention(dim=dim, heads=heads, dim_head=dim_head)
        self.ff = feed_forward(dim, ff_mult, activation)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = self.attn(media, latents) + latents
        return self.ff(latents) + latents


class PerceiverResampler(nn.Module):
    """Resamples each media's features `(N, V, D_v)` to `(N, L, D_v)` learned latents; a clip's frames `(N, F, V, D_v)`
    first get their time embeddings (`flatten_frames`), here in the module's own forward so that a device map's hooks
    bring `frame_embs` in with the rest of the resampler."""

    def __init__(self, *, dim: int, depth: int, heads: int, dim_head: int, num_latents: int, ff_mult: int,
                 max_num_media: int | None = None, max_num_frames: int | None = None, activation: str = "gelu"):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media else None
        self.layers = nn.ModuleList(
            PerceiverLayer(dim=dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, activation=activation)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor, media_index: torch.LongTensor) -> torch.Tensor:
        """`media_index` `(N,)`: each media's position among its sample's media (for the media-time embeddings)."""
        if media.dim() == 4:  # clips (N, F, V, D_v): every frame's tokens plus its time embedding, one media a clip
            if self.frame_embs is None:
                raise ValueError("This resampler reads no clips: its config sets no `max_num_frames`.")
            media = flatten_frames(media, self.frame_embs)
        if self.media_time_embs is not None:
            if int(media_index.max()) >= self.media_time_embs.shape[0]:
                raise ValueError(f"A sample has more media than `max_num_media` ({self.media_time_embs.shape[0]}).")
            media = media + self.media_time_embs[media_index]  # (N, V, D_v) + (N, 1, D_v)
        latents = self.latents.expand(media.shape[0], -1, -1)  # (N, L, D_v)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    """Text `(B, T, D)` attends to media keys/values `(B, H, M*L, d)` under a per-token media mask."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int, rms_norm_eps: float | None = None):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim) if rms_norm_eps is None else nn.RMSNorm(dim, eps=rms_norm_eps)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.to_kv(media).chunk(2, dim=-1)  # (B, M*L, D_v) -> (B, M*L, H*d) each
        return split_heads(k, self.heads), split_heads(v, self.heads)  # (B, H, M*L, d) each

    def forward(self, x, kv, allowed, no_media):
        q = split_heads(self.to_q(self.norm(x)), self.heads)  # (B, H, T, d)
        k, v = kv
        # Rows with no media would be all -inf: let them attend anywhere, then zero them.
        mask = (allowed | no_media[..., None])[:, None]  # (B, 1, T, M*L)
        out = merge_heads(F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask))
        return self.to_out(out.masked_fill(no_media[..., None], 0.0))  # (B, T, D)


class GatedCrossAttentionBlock(nn.Module):
    """
    `style="openflamingo"`: LayerNorm, GELU feed-forward `dim * ff_mult` wide. `style="idefics"`: RMSNorm (the LM's
    eps) and the LM's own SwiGLU feed-forward shape. Gates are one scalar each, or one per hidden unit (`vector_gates`).
    """

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int, ff_mult: int, style: str = "openflamingo",
                 vector_gates: bool = False, lm_intermediate_size: int | None = None, lm_act: str = "silu",
                 rms_norm_eps: float = 1e-6):
        super().__init__()
        idefics = style == "idefics"
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, heads=heads, dim_head=dim_head,
                                         rms_norm_eps=rms_norm_eps if idefics else None)
        gate_shape = (1, 1, dim) if vector_gates else (1,)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape))
        self.ff = (SwiGLUFeedForward(dim=dim, hidden_dim=lm_intermediate_size, act=lm_act, eps=rms_norm_eps) if idefics
                   else feed_forward(dim, ff_mult))
        self.ff_gate = nn.Parameter(torch.zeros(gate_shape))

    def forward(self, x: torch.Tensor, context: "CrossAttentionContext | None" = None) -> torch.Tensor:
        if context is not None:
            kv = context.cache.kv.get(self)
            if kv is None:  # computed here, inside the block's own call, so offloading hooks have its weights
                kv = self.attn.media_kv(context.cache.media.to(x.device))
                if context.reuse_kv:
                    context.cache.kv[self] = kv
            allowed, no_media = context.allowed.to(x.device), context.no_media.to(x.device)
            x = self.attn(x, kv, allowed, no_media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


def build_perceiver(config: FusionFlamingoConfig) -> PerceiverResampler:
    """The resampler `config` describes, at the vision tower's width."""
    return PerceiverResampler(
        dim=config.vision_config.hidden_size, depth=config.perceiver_depth, heads=config.perceiver_heads,
        dim_head=config.perceiver_head_dim, num_latents=config.num_latents, ff_mult=config.perceiver_ff_mult,
        max_num_media=config.max_num_media, max_num_frames=config.max_num_frames,
        activation=config.perceiver_activation,
    )


def build_gated_block(config: FusionFlamingoConfig) -> GatedCrossAttentionBlock:
    """One gated block as `config` describes it, at the LM's width (IDEFICS-style: the LM's FFN shape and norm eps)."""
    text = config.text_config
    return GatedCrossAttentionBlock(
        dim=text.hidden_size, dim_visual=config.vision_config.hidden_size, heads=config.cross_attention_heads,
        dim_head=config.cross_attention_head_dim, ff_mult=config.cross_attention_ff_mult,
        style=config.cross_attention_style, vector_gates=config.gate_shape == "vector",
        lm_intermediate_size=getattr(text, "intermediate_size", None), lm_act=getattr(text, "hidden_act", "silu"),
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
    )


@dataclass
class MediaCache:
    """What decoding carries from step to step: each sample's latents, its media count, and per-layer keys/values."""

    media: torch.Tensor  # (B, M*L, D_v) latents of each sample's media (images and clips), zero-padded to M media
    num_media: torch.LongTensor  # (B,) media of each sample
    seen: torch.LongTensor  # (B,) `<image>` and `<video>` tokens read so far
    latents_per_image: int
    kv: dict = field(default_factory=dict)  # gated block -> (k, v), each (B, H, M*L, d)


@dataclass
class CrossAttentionContext:
    """What the gated blocks read during one forward: the media and which of it each token may see."""

    cache: MediaCache
    allowed: torch.BoolTensor  # (B, T, M*L)
    no_media: torch.BoolTensor  # (B, T) tokens with no media to attend to
    reuse_kv: bool


@dataclass
class FusionFlamingoModelOutputWithPast(FusionModelOutputWithPast):
    r"""
    media_cache (`MediaCache`, *optional*): the images' latents and cross-attention keys/values, for decoding.
    """

    media_cache: MediaCache | None = None


@dataclass
class FusionFlamingoOutputWithPast(FusionCausalLMOutputWithPast):
    r"""
    media_cache (`MediaCache`, *optional*): the images' latents and cross-attention keys/values, for decoding.
    """

    media_cache: MediaCache | None = None


class FusionFlamingoModel(FusionModel):
    r"""
    A vision tower, a perceiver resampler and gated cross-attention blocks woven into the LM's base decoder (no head).
    A fresh model (gates at 0) computes exactly its language model's hidden states.

    `pixel_values` `(num_images, channels, height, width)` hold the batch's images in the order of their `<image>`
    tokens, sample by sample; each `<image>` token is one image. `pixel_values_videos` `(num_videos, num_frames,
    channels, height, width)` likewise hold the clips, one `<video>` token each.
    """

    config_class = FusionFlamingoConfig
    _no_split_modules = ["PerceiverLayer"]  # gated blocks ride inside the LM's (unsplit) decoder layers
    _bridge_modules = ["perceiver"]  # and the gated blocks, which live inside the LM's decoder layers
    _unquantized_modules = FusionModel._unquantized_modules + [
        r"(?:model\.)?perceiver", r"(?:model\.)?language_model\..*\.gated_cross_attn_layer"
    ]
    # Clips' time embeddings, absent from an image-only checkpoint given `max_num_frames` to read video: initialised
    # (images never read them, so their logits are unchanged)
    _keys_to_ignore_on_load_missing = [r"perceiver\.frame_embs"]

    def __init__(self, config: FusionFlamingoConfig, **parts):
        if getattr(config.text_config, "_attn_implementation", None) == "vllm":  # vLLM's Transformers backend
            raise ValueError(
                "vLLM's Transformers backend cannot serve Flamingo-style models (fusion_flamingo): it gives a model "
                "its text embeddings only, so the gated cross-attention would never see the images and the tokens "
                "would be wrong. vlm-fusion's vLLM plugin serves them natively: install vlm-fusion where vLLM runs."
            )
        super().__init__(config, **parts)
        self.perceiver = build_perceiver(config)
        _, decoder_layers = find_decoder_layers(self.language_model)
        for index in config.gated_layer_indices():
            layer = decoder_layers[index]
            layer.gated_cross_attn_layer = build_gated_block(config)
            layer.register_forward_pre_hook(self._cross_attend, with_kwargs=True)
        self.reuse_media_kv = True  # False recomputes each block's media keys/values every step (OpenFlamingo)
        self._context = None  # CrossAttentionContext of the running forward
        self.post_init()

    @property
    def gated_cross_attn_layers(self) -> dict[str, GatedCrossAttentionBlock]:
        """The gated blocks by the index of the decoder layer they precede."""
        _, layers = find_decoder_layers(self.language_model)
        return {str(i): layers[i].gated_cross_attn_layer for i in self.config.gated_layer_indices()}

    def bridge_modules(self) -> dict[str, nn.Module]:
        return {**super().bridge_modules(),
                "gated_cross_attn_layers": nn.ModuleList(self.gated_cross_attn_layers.values())}

    def modules_inside_backbones(self) -> list[nn.Module]:
        return list(self.gated_cross_attn_layers.values())

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerceiverResampler):
            for param in (module.latents, module.frame_embs, module.media_time_embs):
                if param is not None:
                    init.normal_(param, std=1.0)
        elif isinstance(module, GatedCrossAttentionBlock):  # a fresh block adds nothing: tanh(0) = 0
            init.zeros_(module.attn_gate)
            init.zeros_(module.ff_gate)

    # ---- the contract with the LM: one pre-hook per gated decoder layer --------------------------------------
    def _cross_attend(self, layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, D)
        hidden = layer.gated_cross_attn_layer(hidden, self._context)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # ---- images ---------------------------------------------------------------------------------------------
    def encode_images(self, features: torch.Tensor, media_index: torch.LongTensor | None = None, **kwargs):
        """
        Each image's latents `(num_images, num_latents, vision_hidden_size)` from its features; `media_index`
        `(num_images,)` is each image's position among its sample's images (0 for all when not given).
        """
        if media_index is None:
            media_index = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
        dtype = self.perceiver.latents.dtype
        return self.perceiver(features.to(dtype), media_index.to(features.device))  # (N, L, D_v)

    def encode_videos(self, features: torch.Tensor, media_index: torch.LongTensor | None = None, **kwargs):
        """
        Each clip's latents `(num_videos, num_latents, vision_hidden_size)` from its frames' features `(num_videos,
        num_frames, num_patches, vision_hidden_size)`: time embeddings added, all frames resampled together.
        """
        return self.encode_images(features, media_index)  # the resampler adds the time embeddings

    def encode_media(self, pixel_values: torch.FloatTensor | None, media_mask: torch.BoolTensor,
                     pixel_values_videos: torch.FloatTensor | None = None, video_mask: torch.BoolTensor | None = None):
        """
        The batch's images and clips as one `MediaCache`, each sample's media in the order of their markers, and the
        image and video encoders' outputs. `media_mask` `(B, T)` marks every `<image>` and `<video>` token,
        `video_mask` `(B, T)` the `<video>` ones.
        """
        if pixel_values_videos is not None and self.config.video_token_id is None:
            raise ValueError(f"This {self.config.model_type} model takes no video: its config has no `video_token_id`.")
        video_mask = torch.zeros_like(media_mask) if video_mask is None else video_mask
        num_media = media_mask.sum(-1)  # (B,)
        is_video = video_mask[media_mask]  # (N,) each media, sample by sample in text order: a clip?
        for kind, pixels, markers, token_id in (("image", pixel_values, ~is_video, self.config.image_token_id),
                                                ("video", pixel_values_videos, is_video, self.config.video_token_id)):
            given = 0 if pixels is None else pixels.shape[0]
            if int(markers.sum()) != given:
                raise ValueError(
                    f"{kind.capitalize()} tokens and {kind}s do not match: the text holds {int(markers.sum())} {kind} "
                    f"tokens (id {token_id}), {given} {kind}s were given."
                )
        sample = torch.repeat_interleave(torch.arange(len(num_media), device=num_media.device), num_media)  # (N,)
        first = torch.cumsum(num_media, 0) - num_media  # (B,) index of each sample's first media
        media_index = torch.arange(len(sample), device=sample.device) - first[sample]  # (N,)
        image_outputs = video_outputs = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, media_index=media_index[~is_video], return_dict=True)
        if pixel_values_videos is not None:
            if pixel_values_videos.dim() != 5:
                raise ValueError("`pixel_values_videos` must be (num_videos, num_frames, channels, height, width), "
                                 f"got shape {tuple(pixel_values_videos.shape)}.")
            video_outputs = self.get_video_features(pixel_values_videos, media_index=media_index[is_video],
                                                    return_dict=True)
        if video_outputs is None:  # images only: their latents as they come
            latents = image_outputs.pooler_output  # (N, L, D_v)
        else:
            clips = video_outputs.pooler_output  # (N_clips, L, D_v)
            latents = clips.new_empty(len(sample), *clips.shape[1:])  # (N, L, D_v)
            latents[is_video.to(clips.device)] = clips
            if image_outputs is not None:
                latents[~is_video.to(clips.device)] = image_outputs.pooler_output.to(clips.dtype)
        N, L, D = latents.shape
        M = max(int(num_media.max()), 1)
        media = latents.new_zeros(len(num_media), M, L, D)
        media[sample.to(latents.device), media_index.to(latents.device)] = latents  # (B, M, L, D_v)
        zeros = torch.zeros_like(num_media)
        cache = MediaCache(media=media.view(len(num_media), M * L, D), num_media=num_media, seen=zeros,
                           latents_per_image=L)
        return cache, image_outputs, video_outputs

    def blank_media(self, batch_size: int) -> MediaCache:
        """A blank image's latents for every sample, none of them visible (`num_media` 0): a text-only training step
        still runs the tower, the resampler and every gated block's attention, whose output is then zeroed, so
        their gradients are exactly 0 (see `FusionModel.blank_image_tokens`)."""
        latents = self.blank_image_tokens()  # (1, L, D_v)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=latents.device)
        return MediaCache(media=latents.expand(batch_size, -1, -1), num_media=zeros, seen=zeros,
                          latents_per_image=latents.shape[1])

    def _media_masks(self, cache: MediaCache, media_mask: torch.BoolTensor):
        """Which latents each token may attend to `(B, T, M*L)`, and which tokens have none `(B, T)`."""
        text_time = cache.seen[:, None] + media_mask.cumsum(-1)  # (B, T): index (from 1) of the latest media
        M = cache.media.shape[1] // cache.latents_per_image
        media_time = torch.arange(1, M + 1, device=text_time.device).repeat_interleave(cache.latents_per_image)
        exists = media_time[None, None, :] <= cache.num_media[:, None, None]  # (B, 1, M*L)
        if self.config.only_attend_immediate_media:
            allowed = text_time[..., None] == media_time  # (B, T, M*L)
        else:
            allowed = text_time[..., None] >= media_time
        allowed = allowed & exists
        return allowed, ~allowed.any(-1)

    # ---- forward ----------------------------------------------------------------------------------------------
    @can_return_tuple
    @takes_cache_as_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        media_cache: MediaCache | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        **kwargs,
    ) -> FusionFlamingoModelOutputWithPast:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): one `<image>` token per image, one
            `<video>` token per clip.
        pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`, *optional*).
        pixel_values_videos (`torch.FloatTensor` of shape `(num_videos, num_frames, channels, height, width)`,
            *optional*).
        media_cache (`MediaCache`, *optional*): carried by `generate` from step to step; not for direct use.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # `<image>` is a real LM token here
        image_outputs = video_outputs = None
        has_pixels = pixel_values is not None or pixel_values_videos is not None
        if not has_pixels and media_cache is None and self.training:
            media_cache = self.blank_media(inputs_embeds.shape[0])  # see `blank_image_tokens`
        # transformers 5.19 checkpoints a decoder layer with its hooks, so the backward replays the gated blocks: they
        # need the context then, and must compute their media keys/values again as the forward did, not find them kept
        checkpointing = self.training and is_activation_checkpointing(self)
        if has_pixels or media_cache is not None:
            media_mask = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, T) `<image>` tokens
            video_mask = None
            if self.config.video_token_id is not None:
                video_mask = self.get_placeholder_mask(input_ids, inputs_embeds, token_id=self.config.video_token_id)
                media_mask = media_mask | video_mask  # (B, T) every media marker
            if has_pixels:
                media_cache, image_outputs, video_outputs = self.encode_media(pixel_values, media_mask,
                                                                              pixel_values_videos, video_mask)
            if self.training and self.config.video_token_id is not None and pixel_values_videos is None:
                blank = 0.0 * self.blank_video_tokens().sum()  # see `FusionModel.blank_video_tokens`
                media_cache = replace(media_cache, media=media_cache.media + blank.to(media_cache.media.dtype))
            allowed, no_media = self._media_masks(media_cache, media_mask)
            self._context = CrossAttentionContext(media_cache, allowed, no_media,
                                                  self.reuse_media_kv and not checkpointing)
        if position_ids is None:
            position_ids = self.left_padded_positions(attention_mask, inputs_embeds.shape[1])
        try:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                **cache_kwargs(self.language_model, cache), use_cache=use_cache, return_dict=True, **kwargs,
            )
        finally:
            if not checkpointing:
                self._context = None
        if media_cache is not None:
            media_cache = MediaCache(media=media_cache.media, num_media=media_cache.num_media,
                                     seen=media_cache.seen + media_mask.sum(-1), kv=media_cache.kv,
                                     latents_per_image=media_cache.latents_per_image)
        return FusionFlamingoModelOutputWithPast(**outputs, image_outputs=image_outputs, video_outputs=video_outputs,
                                                 media_cache=media_cache)


class FusionFlamingoForConditionalGeneration(FusionForConditionalGeneration, GenerationMixin):
    """[`FusionFlamingoModel`] with the LM's head: what `AutoModelForImageTextToText` builds for `fusion_flamingo`."""

    config_class = FusionFlamingoConfig
    model_class = FusionFlamingoModel
    output_class = FusionFlamingoOutputWithPast

    @property
    def gated_cross_attn_layers(self) -> dict[str, GatedCrossAttentionBlock]:
        return self.model.gated_cross_attn_layers

    @property
    def reuse_media_kv(self) -> bool:
        """Whether decoding reuses each gated block's media keys/values (True) or recomputes them (OpenFlamingo)."""
        return self.model.reuse_media_kv

    @reuse_media_kv.setter
    def reuse_media_kv(self, value: bool):
        self.model.reuse_media_kv = value

    def encode_media(self, pixel_values, media_mask, pixel_values_videos=None, video_mask=None):
        return self.model.encode_media(pixel_values, media_mask, pixel_values_videos, video_mask)[0]

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        model_kwargs["media_cache"] = outputs.media_cache
        return model_kwargs

    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path, text_model_name_or_path, video: bool = False,
                                    **kwargs):
        """
        As for every family. `<image>` and `<|endofchunk|>` (and `<video>`, with `video=True`) get the ids OpenFlamingo's
        token order gives them in the LM's tokenizer (as `FusionFlamingoProcessor` adds them), and the LM's embeddings
        grow to hold them.
        """
        model = super().from_vision_text_pretrained(vision_model_name_or_path, text_model_name_or_path, video=video,
                                                    **flamingo_token_ids(text_model_name_or_path, kwargs, video))
        model.embed_marker_tokens()
        return model

    def embed_marker_tokens(self) -> None:
        """The LM reads `<image>`, `<|endofchunk|>` and `<video>` as tokens: its embeddings grow to hold their ids."""
        needed = max(self.config.image_token_id, self.config.end_of_chunk_token_id or 0,
                     self.config.video_token_id or 0) + 1
        if needed > self.config.text_config.vocab_size:
            self.resize_token_embeddings(needed)

    @classmethod
    def config_from_vision_text_pretrained(cls, vision_model_name_or_path, text_model_name_or_path, video: bool = False,
                                           **kwargs):
        return super().config_from_vision_text_pretrained(vision_model_name_or_path, text_model_name_or_path,
                                                          video=video,
                                                          **flamingo_token_ids(text_model_name_or_path, kwargs, video))


def flamingo_token_ids(text_model_name_or_path: str, kwargs: dict, video: bool = False) -> dict:
    """`kwargs` with the ids OpenFlamingo's token order gives `<image>` and `<|endofchunk|>` in the LM's tokenizer
    (and `<video>` after them, with `video`), unless given."""
    if "image_token_id" in kwargs or "media_token_id" in kwargs:
        return kwargs
    from transformers import AutoTokenizer

    from .special_tokens import add_flamingo_tokens, add_special_token

    tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
    image_token_id, end_of_chunk_token_id = add_flamingo_tokens(tokenizer)
    ids = {"image_token_id": image_token_id, "end_of_chunk_token_id": end_of_chunk_token_id}
    if video and kwargs.get("video_token_id") is None:
        ids["video_token_id"] = add_special_token(tokenizer, "<video>")
    return {**kwargs, **ids}
