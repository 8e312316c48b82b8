"""`method="relevance"`: gradient-weighted attention propagated from a text token to the image's patches.

Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (ICCV 2021). Per attention layer, with A its attention `(H, n, m)` and ∇A the gradient of the token's
logit with respect to it:

    Ā = E_h[(∇A ⊙ A)⁺]                                         (eq. 5, `gradient_weighted`)
    self-attention of tokens s:       R_ss += Ā·R_ss,  R_sx += Ā·R_sx      (eq. 6-7, `self_rule`)
    cross-attention of s over keys q: R_sq += R̄_ssᵀ·Ā·R̄_qq                 (eq. 10, `cross_rule`)

R̄ is R with its identity taken out, each row normalised to sum to one, and the identity put back (eq. 8-9,
`normalised`). The rule R_ss += Ā·R_qs (eq. 11) adds nothing here: no key of a bridge ever attends to the tokens
that read it (R_qs = 0).

The route from a token to the patches is a chain of stages, each with its own relevance from its outputs to its
inputs, and the chain is their product:

- the vision tower (self-attention): R_ii `(V_all, V_all)` from its output tokens to its input tokens (a prefix
  token such as CLS is dropped at the end: it is a learned vector, not a place in the image);
- the bridge: LLaVA's projector mixes no tokens (identity); BLIP-2's Q-Former gives R_qi `(Q, V)` (self rule over its
  queries, cross rule over the image features, with R_qq of the queries and R̄ = I for the features, the stage's
  inputs); Flamingo's resampler gives R_li `(L_lat, V)` the same way, its one softmax over [media; latents] split
  into its cross part (over the media) and its self part (over the latents), both applied to the layer's R before it;
- the LM: the self rule over the sequence (LLaVA's image positions and BLIP-2's queries are in it); Flamingo's gated
  blocks add the cross rule over the latents (R̄ = I for the latents, the LM's inputs). The gate multiplies the
  block's output, so it is in ∇A: a shut gate gives Ā = 0 and no relevance.

The token's row of the LM's relevance, on the image's positions (or latents), times the bridge's and the tower's,
is the map over the patches. One forward pass with every attention kept (the LM's and the tower's as `eager`, the
bridges' recomputed from their inputs), then one backward pass per answer token.

How ∇A is read: the LM's and the tower's attention come from their eager forward, in the graph, so autograd gives
∇A. The bridges run SDPA, which keeps no A: A is recomputed from the module's inputs, and since the heads' output is
O = A·V, ∇A = ∇O·Vᵀ with ∇O the gradient at the input of the module's `to_out`.

Legend: S sequence, T answer tokens, H heads, V patches (V_all with the tower's prefix), Q queries, L_lat latents.
"""

from contextlib import contextmanager

import torch

from ..modeling_flamingo import PerceiverAttention, find_decoder_layers, split_heads
from ..modeling_qformer import QFormerAttention
from .routes import ExplainError, eager_attention, gated_probs, image_runs, patch_grid


# ---- the rules ---------------------------------------------------------------------------------------------------
def gradient_weighted(probs: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Ā = E_h[(∇A ⊙ A)⁺]: `(H, n, m)` -> `(n, m)`; a layer the token does not depend on (no gradient) gives 0."""
    if grad is None:
        return torch.zeros(probs.shape[-2:], dtype=torch.float32, device=probs.device)
    return (grad.float() * probs.float()).clamp_min(0).mean(0)


def normalised(relevance: torch.Tensor) -> torch.Tensor:
    """R̄ = (R - I) with rows summed to one, + I (a row with nothing besides the identity stays the identity's)."""
    eye = torch.eye(len(relevance), device=relevance.device)
    rest = relevance - eye
    return rest / rest.sum(-1, keepdim=True).where(rest.sum(-1, keepdim=True) > 0, 1.0) + eye


def self_rule(r_ss: torch.Tensor, r_sx: torch.Tensor | None, cam: torch.Tensor):
    """Self-attention of s: R_ss += Ā·R_ss, and R_sx += Ā·R_sx for what s has read from elsewhere."""
    return r_ss + cam @ r_ss, (None if r_sx is None else r_sx + cam @ r_sx)


def cross_rule(r_ss: torch.Tensor, r_sq: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """s reads keys q that are the stage's inputs (R_qq = I, so R̄_qq = I): R_sq += R̄_ssᵀ·Ā."""
    return r_sq + normalised(r_ss).T @ cam


# ---- capturing attention and its gradient --------------------------------------------------------------------------
def attention_module(layer):
    """The self-attention module of a transformers layer (CLIP/SigLIP/Llama: `self_attn`; ViT/DINOv2: `attention`)."""
    for name in ("self_attn", "attention", "attn", "self_attention"):
        if hasattr(layer, name):
            return getattr(layer, name)
    raise ExplainError(f"{type(layer).__name__} has no self-attention module explain knows (self_attn, attention)")


class Captured:
    """One attention call: its `kind`, A `(N, H, n, m)` and what its gradient is read from."""

    def __init__(self, kind: str, probs: torch.Tensor, source: torch.Tensor, values: torch.Tensor | None = None):
        self.kind, self.probs, self.source, self.values = kind, probs, source, values

    def grad_of_probs(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        """∇A from the gradient at `source`: A itself (eager), or the heads' output O = A·V (∇A = ∇O·Vᵀ)."""
        if grad is None or self.values is None:
            return grad
        N, S, _ = grad.shape
        H = self.values.shape[1]
        return grad.view(N, S, H, -1).transpose(1, 2) @ self.values.transpose(-1, -2)  # (N, H, S, d) @ (N, H, d, m)


def _bridge_probs(module, args, kwargs):
    """A `(N, H, n, m)` and V `(N, H, m, d)` of a bridge's attention call, recomputed from its inputs."""
    if isinstance(module, QFormerAttention):
        x = args[0]
        context = args[1] if len(args) > 1 else kwargs.get("context")
        context = x if context is None else context
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        N, L, D = x.shape
        H = module.heads
        q = module.to_q(x).view(N, L, H, D // H).transpose(1, 2)  # (N, H, L, d)
        k = module.to_k(context).view(N, context.shape[1], H, D // H).transpose(1, 2)  # (N, H, S, d)
        v = module.to_v(context).view(N, context.shape[1], H, D // H).transpose(1, 2)  # (N, H, S, d)
        scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.float().softmax(-1), v
    if isinstance(module, PerceiverAttention):
        media, latents = module.norm_media(args[0]), module.norm_latents(args[1])
        q = split_heads(module.to_q(latents), module.heads)  # (N, H, L, d)
        k, v = module.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)  # (N, V + L, H*d) each
        k, v = split_heads(k, module.heads), split_heads(v, module.heads)  # (N, H, V + L, d)
        return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).float().softmax(-1), v  # (N, H, L, V + L)
    x, kv, allowed, no_media = args  # MaskedCrossAttention
    return gated_probs(module, x, kv, allowed, no_media), kv[1]


@contextmanager
def capturing(modules_by_kind: dict):
    """Within the block, every call of the given modules appends a `Captured` to the yielded list, in call order.
    Eager self-attention modules (kind "lm", "tower") give their A from their output; bridges' (any other kind) are
    recomputed, their gradient read at their `to_out`'s input."""
    found, pending, hooks = [], {}, []

    def self_attention_hook(kind):
        def hook(module, args, output):
            if not isinstance(output, tuple) or output[1] is None:
                raise ExplainError(f"{type(module).__name__} returned no attention weights: relevance needs eager "
                                   "attention in the language model and the vision tower")
            found.append(Captured(kind, output[1], output[1]))
        return hook

    def bridge_hook(kind):
        def hook(module, args, kwargs, output):
            probs, values = _bridge_probs(module, args, kwargs)
            found.append(Captured(kind, probs.detach(), pending.pop(module), values.detach().float()))
        return hook

    try:
        for kind, modules in modules_by_kind.items():
            for module in modules:
                if kind in ("lm", "tower"):
                    hooks.append(module.register_forward_hook(self_attention_hook(kind)))
                else:
                    hooks.append(module.to_out.register_forward_pre_hook(
                        lambda m, args, owner=module: pending.__setitem__(owner, args[0])))
                    hooks.append(module.register_forward_hook(bridge_hook(kind), with_kwargs=True))
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def tower_layers(model):
    _, layers = find_decoder_layers(model.model.vision_tower)
    return [attention_module(layer) for layer in layers]


def lm_layers(model):
    _, layers = find_decoder_layers(model.model.language_model)
    return [attention_module(layer) for layer in layers]


# ---- the stages ----------------------------------------------------------------------------------------------------
def tower_relevance(calls: list[Captured], cams: list[torch.Tensor], image: int) -> torch.Tensor:
    """`(V_all, V_all)`: the tower's output tokens' relevance on its input tokens, for image `image`."""
    size = calls[0].probs.shape[-1]
    relevance = torch.eye(size, device=cams[0].device)
    for cam in cams:
        relevance, _ = self_rule(relevance, None, cam[image])
    return relevance


def to_patches(relevance: torch.Tensor, tower: torch.Tensor, model) -> torch.Tensor:
    """Relevance `(..., n)` on the tower's last `n` output tokens (the bridge's features) -> `(..., h, w)` patches."""
    prefix, h, w = patch_grid(model.config.vision_config, tower.shape[-1])
    on_inputs = relevance @ tower[tower.shape[0] - relevance.shape[-1]:]  # (..., V_all)
    return on_inputs[..., prefix:].reshape(*relevance.shape[:-1], h, w)


def lm_relevance(calls, cams, kind_cross: str | None = None, latents: int = 0):
    """R_tt `(S, S)` of the LM's self rule, and for Flamingo R_tl `(S, M*L_lat)` from the gated blocks' cross rule."""
    size = next(c.probs.shape[-1] for c in calls if c.kind == "lm")
    r_tt = torch.eye(size, device=cams[0].device)
    r_tl = torch.zeros(size, latents, device=cams[0].device) if kind_cross else None
    for call, cam in zip(calls, cams):
        if call.kind == "lm":
            r_tt, r_tl = self_rule(r_tt, r_tl, cam[0])
        elif call.kind == kind_cross:
            r_tl = cross_rule(r_tt, r_tl, cam[0])
    return r_tt, r_tl


def relevance_maps(model, inputs: dict, rows: torch.Tensor, token_ids: torch.Tensor, progress=None) -> list[torch.Tensor]:
    """Per image `(T, h, w)`: each answer token's relevance on the image's patches (see the module doc)."""
    family = model.config.model_type
    kinds = {"tower": tower_layers(model), "lm": lm_layers(model)}
    if family == "fusion_blip2":
        layers = model.model.qformer.layers
        kinds["qformer_self"] = [layer.self_attn for layer in layers]
        kinds["qformer_cross"] = [layer.cross_attn for layer in layers if hasattr(layer, "cross_attn")]
    elif family == "fusion_flamingo":
        kinds["resampler"] = [layer.attn for layer in model.model.perceiver.layers]
        kinds["gated"] = [block.attn for block in model.model.gated_cross_attn_layers.values()]
    with eager_attention(model), eager_attention(model, "vision_config"), capturing(kinds) as calls, torch.enable_grad():
        logits = model(**inputs).logits[0]  # (S, vocab)
    if not any(call.kind == "lm" for call in calls):
        raise ExplainError("no attention layer of the language model ran")
    chosen = logits[rows, token_ids.to(logits.device)]  # (T,)
    maps = []
    steps = range(len(rows))
    for t in progress(steps, desc="explain: relevance, a backward pass per token") if progress else steps:
        grads = torch.autograd.grad(chosen[t], [c.source for c in calls], retain_graph=True, allow_unused=True)
        cams = [torch.stack([gradient_weighted(p, g) for p, g in zip(call.probs, grad_per_item(call, grad))])
                for call, grad in zip(calls, grads)]  # each (N, n, m)
        maps.append(token_relevance(model, inputs, calls, cams, int(rows[t])))
    return [torch.stack([per_token[i] for per_token in maps]) for i in range(len(maps[0]))]


def grad_per_item(call: Captured, grad):
    grad = call.grad_of_probs(grad)
    return [None] * len(call.probs) if grad is None else list(grad)


def token_relevance(model, inputs, calls, cams, row: int) -> list[torch.Tensor]:
    """Per image `(h, w)`: one token's relevance through the LM, the bridge and the tower."""
    family = model.config.model_type
    by_kind = lambda kind: [(c, cam) for c, cam in zip(calls, cams) if c.kind == kind]  # noqa: E731
    tower = by_kind("tower")
    towers = [tower_relevance([c for c, _ in tower], [cam for _, cam in tower], i)
              for i in range(len(inputs["pixel_values"]))]
    mask = inputs["input_ids"][0] == model.config.image_token_id
    if family == "fusion_llava":
        r_tt, _ = lm_relevance(calls, cams)
        counts = [int(mask.sum()) // len(towers)] * len(towers)
        return [to_patches(r_tt[row, positions], towers[i], model)
                for i, positions in enumerate(image_runs(mask, counts))]
    if family == "fusion_blip2":
        r_tt, _ = lm_relevance(calls, cams)
        queries = model.config.num_query_tokens
        out = []
        for i, positions in enumerate(image_runs(mask, [queries] * len(towers))):
            r_qi = bridge_relevance(by_kind("qformer_self") + by_kind("qformer_cross"), calls, cams, i, queries)
            out.append(to_patches(r_tt[row, positions] @ r_qi, towers[i], model))
        return out
    resampler = by_kind("resampler")
    latents = resampler[0][0].probs.shape[-2]  # L_lat per image
    _, r_tl = lm_relevance(calls, cams, kind_cross="gated", latents=by_kind("gated")[0][1].shape[-1])  # (S, M*L_lat)
    out = []
    for i in range(len(towers)):
        r_li = bridge_relevance(resampler, calls, cams, i, latents)
        out.append(to_patches(r_tl[row, i * latents : (i + 1) * latents] @ r_li, towers[i], model))
    return out


def bridge_relevance(pairs, calls, cams, image: int, queries: int) -> torch.Tensor:
    """`(Q, V_feat)`: the bridge's queries (or latents) relevance on the features they read, for image `image`.
    Q-Former: self rule, then cross rule, layer by layer (in call order); resampler: its joint softmax split into its
    self part (over the latents, after the media) and its cross part (over the media), both from the layer's R."""
    order = {id(c): index for index, c in enumerate(calls)}
    pairs = sorted(pairs, key=lambda pair: order[id(pair[0])])
    r_qq = torch.eye(queries, device=pairs[0][1].device)
    r_qi = None
    for call, cam in pairs:
        cam = cam[image]
        if call.kind == "qformer_self":
            cam = cam[:queries, :queries]  # the queries' rows and columns (text, if any, is not on the image's path)
            r_qq, r_qi = self_rule(r_qq, r_qi, cam)
        elif call.kind == "qformer_cross":
            r_qi = cross_rule(r_qq, torch.zeros(queries, cam.shape[-1], device=cam.device) if r_qi is None else r_qi,
                              cam)
        else:  # resampler: keys are [media; latents]
            media = cam.shape[-1] - queries
            r_qi = torch.zeros(queries, media, device=cam.device) if r_qi is None else r_qi
            r_next, r_qi_self = self_rule(r_qq, r_qi, cam[:, media:])
            r_qi = cross_rule(r_qq, r_qi_self, cam[:, :media])
            r_qq = r_next
    return r_qi

