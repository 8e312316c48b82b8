"""How each family routes the image to a text token, read back as attention over the image's patch grid.

A route turns one forward pass over prompt + answer into `(T, L, H, h, w)` per image: for each of the T answer
tokens, each of the route's L layers and H heads, the attention mass that reaches each patch cell of the image.

- LLaVA-style (`llava_route`): the LM's attention from the position that predicted the token to the image's
  visual-token positions. With anyres, the unpadded grid is the map (the image's aspect ratio) and the base tile's
  mass is spread over it; `image_newline` positions are left out.
- BLIP-2-style (`blip2_route`): the LM's attention to the image's N_q query positions, times each query's Q-Former
  cross-attention over the patches (averaged over the Q-Former's cross-attention layers and heads).
- Flamingo-style (`flamingo_route`): each gated block's attention over the image's latents, times each latent's
  resampler attention over the patches (averaged over the resampler's layers and heads). The gates are not applied
  here; `Explanation.maps` weights each block by |tanh(gate)|.

Bridge attentions (Q-Former, resampler, gated blocks) are SDPA in the model; hooks recompute their softmax from the
same inputs and weights. A prefix token of the tower (CLS, registers) is left out, and the rest renormalised, where a
query or latent reads patches: the maps are over the image's area.

Legend: S sequence, T answer tokens, L layers of the route, H heads, V patches (h x w), Q queries / latents.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..anyres import downscaled_shape, grid_shape, unpadded_shape
from ..modeling_flamingo import MaskedCrossAttention, PerceiverAttention, split_heads
from ..modeling_qformer import QFormerAttention
from ..vision import num_prefix_tokens


class ExplainError(ValueError):
    """Input or a model that cannot be explained; the message is one line."""


# ---- capturing the bridges' attention --------------------------------------------------------------------------
def _softmax(scores: torch.Tensor) -> torch.Tensor:
    return scores.float().softmax(-1)


def perceiver_probs(module: PerceiverAttention, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """`(N, H, L, V)`: each latent's attention over the media (its keys are media, then the latents themselves)."""
    media, latents = module.norm_media(media), module.norm_latents(latents)
    q = split_heads(module.to_q(latents), module.heads)  # (N, H, L, d)
    k, _ = module.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
    k = split_heads(k, module.heads)  # (N, H, V + L, d)
    probs = _softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))  # (N, H, L, V + L)
    return probs[..., : media.shape[1]]


def qformer_cross_probs(module: QFormerAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """`(N, H, Q, V)`: each query's cross-attention over the image's features."""
    N, L, D = x.shape
    H = module.heads
    q = module.to_q(x).view(N, L, H, D // H).transpose(1, 2)
    k = module.to_k(context).view(N, context.shape[1], H, D // H).transpose(1, 2)
    return _softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H))


def gated_probs(module: MaskedCrossAttention, x, kv, allowed, no_media) -> torch.Tensor:
    """`(B, H, S, M*L)`: each text position's attention over the latents it may see (rows with none are 0)."""
    q = split_heads(module.to_q(module.norm(x)), module.heads)  # (B, H, S, d)
    k = kv[0].to(q.dtype)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~allowed[:, None], float("-inf"))
    scores = scores.masked_fill(no_media[:, None, :, None], 0.0)
    return _softmax(scores).masked_fill(no_media[:, None, :, None], 0.0)


@contextmanager
def recording(modules, compute):
    """Within the block, `compute(module, *args)` of every call of `modules` is appended to the yielded list."""
    found = []
    hooks = [m.register_forward_hook(lambda m, args, out: found.append(compute(m, *args))) for m in modules]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def eager_attention(model, part: str = "text_config"):
    """The LM's attention (or with `part="vision_config"` the tower's) as `eager`, the implementation that returns its
    weights, for the block, then as it was."""
    before = getattr(model.config, part)._attn_implementation
    try:
        model.set_attn_implementation({part: "eager"})
    except (ValueError, ImportError) as error:
        what = "language model" if part == "text_config" else "vision tower"
        raise ExplainError(f"this model's {what} cannot run eager attention, which returns the attention weights the "
                           f"maps are made of: {str(error).splitlines()[0]}") from error
    try:
        yield
    finally:
        model.set_attn_implementation({part: before})


def lm_attentions(outputs, rows: torch.Tensor) -> torch.Tensor:
    """`(T, L, H, S)`: the LM's attention rows `rows` of sample 0, every layer and head."""
    if not outputs.attentions or any(a is None for a in outputs.attentions):
        raise ExplainError("the language model returned no attention weights (its attention implementation does not "
                           "return them); it must support eager attention")
    return torch.stack([a[0][:, rows].float() for a in outputs.attentions]).permute(2, 0, 1, 3)


# ---- from patches to a grid -----------------------------------------------------------------------------------
def patch_grid(config, tokens: int) -> tuple[int, int, int]:
    """(prefix, h, w) of a tower's output of `tokens` tokens (CLS/registers first, then a square patch grid)."""
    prefix = num_prefix_tokens(config) if tokens != _square(tokens) else 0
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ExplainError(f"{tokens} vision tokens are not a square grid of patches: cannot lay them on the image")
    return prefix, side, side


def _square(n: int) -> int:
    return math.isqrt(n) ** 2


def onto_patches(probs: torch.Tensor, prefix: int) -> torch.Tensor:
    """`(..., V_all)` -> `(..., V)`: a distribution over the tower's tokens, its prefix tokens out, renormalised."""
    patches = probs[..., prefix:]
    return patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)


def spread(mass: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`(..., a, b)` mass on another grid laid over `(h, w)` cells, the total kept (area-weighted resampling)."""
    lead, (a, b) = mass.shape[:-2], mass.shape[-2:]
    flat = mass.reshape(-1, 1, a, b)
    out = F.interpolate(flat, size=(h, w), mode="bilinear", align_corners=False).clamp_min(0)
    out = out * (flat.sum((-1, -2), keepdim=True) / out.sum((-1, -2), keepdim=True).clamp_min(1e-12))
    return out.reshape(*lead, h, w)


# ---- the three routes --------------------------------------------------------------------------------------------
def image_runs(mask: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """The positions of each image's placeholders, in order, from the `(S,)` mask and each image's count."""
    positions = mask.nonzero().flatten()
    if sum(counts) != len(positions):
        raise ExplainError(f"{len(positions)} image positions in the text, {sum(counts)} expected from the images")
    return list(positions.split(counts))


def llava_route(model, inputs: dict, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per image `(T, L, H, h, w)`, and the share of each row's attention on each image `(T, L, H, I)`."""
    with eager_attention(model), torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    attention = lm_attentions(outputs, rows)  # (T, L, H, S)
    mask = inputs["input_ids"][0] == model.config.image_token_id
    inner = model.model
    anyres = inner.anyres
    num_images = len(inputs["pixel_values"])
    if anyres is None:
        counts = [int(mask.sum()) // num_images] * num_images
    else:
        counts = inner.tokens_per_image(image_sizes=inputs["image_sizes"])
    maps, shares = [], []
    for index, positions in enumerate(image_runs(mask, counts)):
        on_image = attention[..., positions]  # (T, L, H, P_i)
        shares.append(on_image.sum(-1))
        if anyres is None:
            prefix, h, w = patch_grid(model.config.vision_config, len(positions))
            maps.append(on_image[..., prefix:].reshape(*on_image.shape[:-1], h, w))
            continue
        p = anyres["tile"] // anyres["patch"]
        size = inputs["image_sizes"][index].tolist()
        rows_, cols = grid_shape(size, anyres["pinpoints"], anyres["tile"])
        h, w = downscaled_shape(*unpadded_shape(size, rows_ * p, cols * p), p, anyres["max_tiles"])  # anyres_max
        base = on_image[..., : p * p].reshape(*on_image.shape[:-1], p, p)
        grid = on_image[..., p * p :].reshape(*on_image.shape[:-1], h, w + 1)[..., :w]  # newline column out
        maps.append(grid + spread(base, h, w))
    return maps, torch.stack(shares, -1)


def blip2_route(model, inputs: dict, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    cross = [layer.cross_attn for layer in model.model.qformer.layers if hasattr(layer, "cross_attn")]
    with eager_attention(model), recording(cross, qformer_cross_probs) as found, torch.no_grad():
        outputs = model(**inputs, output_attentions=True)
    attention = lm_attentions(outputs, rows)  # (T, L, H, S)
    reads = torch.stack(found).mean((0, 2))  # (N, Q, V_all): averaged over cross layers and heads
    prefix, h, w = patch_grid(model.config.vision_config, reads.shape[-1])
    reads = onto_patches(reads, prefix)  # (N, Q, V)
    mask = inputs["input_ids"][0] == model.config.image_token_id
    queries = model.config.num_query_tokens
    maps, shares = [], []
    for index, positions in enumerate(image_runs(mask, [queries] * len(reads))):
        on_queries = attention[..., positions]  # (T, L, H, Q)
        shares.append(on_queries.sum(-1))
        maps.append((on_queries @ reads[index]).reshape(*on_queries.shape[:-1], h, w))
    return maps, torch.stack(shares, -1)


def flamingo_route(model, inputs: dict, rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    resampler = [layer.attn for layer in model.model.perceiver.layers]
    blocks = [block.attn for block in model.model.gated_cross_attn_layers.values()]
    with recording(resampler, perceiver_probs) as resampled, recording(blocks, gated_probs) as gated, torch.no_grad():
        model(**inputs)
    if not gated:
        raise ExplainError("no gated cross-attention block ran: the model has none, or the prompt has no image")
    reads = torch.stack(resampled).mean((0, 2))  # (N, L_lat, V_all): over the resampler's layers and heads
    prefix, h, w = patch_grid(model.config.vision_config, reads.shape[-1])
    reads = onto_patches(reads, prefix)  # (N, L_lat, V)
    attention = torch.stack([probs[0][:, rows] for probs in gated]).permute(2, 0, 1, 3)  # (T, L, H, M*L_lat)
    latents = reads.shape[1]
    maps, shares = [], []
    for index in range(len(reads)):
        on_latents = attention[..., index * latents : (index + 1) * latents]  # (T, L, H, L_lat)
        shares.append(on_latents.sum(-1))
        maps.append((on_latents @ reads[index]).reshape(*on_latents.shape[:-1], h, w))
    return maps, torch.stack(shares, -1)


def gate_values(model) -> dict[str, float]:
    """Each gated block's attention gate as tanh(gate) (the mean of |tanh| for per-unit gates), by decoder layer."""
    return {index: float(block.attn_gate.detach().float().tanh().abs().mean())
            for index, block in model.model.gated_cross_attn_layers.items()}


ROUTES = {"fusion_llava": llava_route, "fusion_blip2": blip2_route, "fusion_flamingo": flamingo_route}
