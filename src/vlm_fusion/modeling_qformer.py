"""The Q-Former (BLIP-2), and its stage-1 model: image–text contrast, matching and generation for any vision tower.

Q-Former (BERT-style, post-norm): learned queries (1, Q, D_q) and, when it reads text, the text's word + position
embeddings (the queries get none), h = [queries; text], layer-normed; then per layer

    h = LN(h + SelfAttn(h, mask))            queries and text share it; `mask` is one of the patterns below
    q = LN(q + CrossAttn(q, image))          queries only, in layers 0, f, 2f, ... (f = cross_attention_frequency)
    q = LN(q + FFN(q));  t = LN(t + FFN_text(t))   each has its own feed-forward

The three attention patterns of stage 1 (`attention_mask`), and the two one-sided passes:

    queries        queries alone (no text): the image's N_q tokens (BLIP-2's generation path, ITC's image side)
    text           text alone (no queries, no image): ITC's text side, read off its first ([CLS]) token
    bidirectional  queries and text attend to each other, padding masked: ITM (and InstructBLIP's instruction)
    causal         queries attend to queries only; text position t attends to every query and to text 0..t: ITG

Stage 1 (`FusionBlip2ForImageTextRetrieval`, facts from LAVIS's `Blip2Qformer`):
    ITC  image_feats = norm(vision_projection(queries)) (N, Q, E), text_feat = norm(text_projection(text[:, 0]))
         (N, E); s(i, t) = max_q image_feats[i, q] . text_feat[t] / temperature; cross-entropy both ways, label
         smoothing 0.1, captions of the same image all positive.
    ITM  for each text a hard negative image, for each image a hard negative text, drawn with weights softmax(s) +
         1e-4 over the global batch (positives at 0); itm_head on the queries' outputs of the bidirectional pass, mean over
         the queries -> 2 logits; cross-entropy on [positives, negative images, negative texts].
    ITG  the caption with `[DEC]` for `[CLS]`, causal pattern, `text_head` (BERT's prediction head, decoder tied to
         the word embeddings) -> next-token cross-entropy, label smoothing 0.1.
Across processes the image and text features are gathered *with* their gradients (LAVIS gathers the ITC features
without), so that N processes x b samples give the loss and gradients of one process x N*b.

Legend: N images (or captions), V vision tokens per image, Q queries, T text tokens, L = Q + T, D_v vision width,
D_q Q-Former width, E contrastive width, H heads, d head width, W processes, B = W * b the global batch.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .checkpoints import ConversionError, preview, read_state_dict, rename_keys
from .configuration_blip2 import FusionBlip2QFormerConfig
from .modeling_base import FusionPreTrainedModel, _mark_initialized
from .vision import build_vision_tower, select_image_features

PATTERNS = ("bidirectional", "causal")
TEMPERATURE_RANGE = (0.001, 0.5)  # BLIP's clamp of the ITC temperature


# ---- the Q-Former ---------------------------------------------------------------------------------------------------
class QFormerAttention(nn.Module):
    """Multi-head attention of `x` `(N, L, D_q)` over `context` `(N, S, context_dim)` (itself for self-attention)."""

    def __init__(self, *, dim: int, context_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.BoolTensor | None = None):
        """`mask` `(N, 1, L or 1, S)`: which of the context's positions each position may attend to."""
        context = x if context is None else context
        N, L, D = x.shape
        S, H = context.shape[1], self.heads
        q = self.to_q(x).view(N, L, H, D // H).transpose(1, 2)  # (N, H, L, d)
        k = self.to_k(context).view(N, S, H, D // H).transpose(1, 2)  # (N, H, S, d)
        v = self.to_v(context).view(N, S, H, D // H).transpose(1, 2)  # (N, H, S, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(N, L, D))  # (N, H, L, d) -> (N, L, D_q)


class QFormerLayer(nn.Module):
    def __init__(self, *, dim: int, heads: int, ff_dim: int, context_dim: int | None, eps: float, dropout: float,
                 text: bool = False):
        super().__init__()
        self.self_attn = QFormerAttention(dim=dim, context_dim=dim, heads=heads, dropout=dropout)
        self.self_attn_norm = nn.LayerNorm(dim, eps=eps)
        if context_dim is not None:
            self.cross_attn = QFormerAttention(dim=dim, context_dim=context_dim, heads=heads, dropout=dropout)
            self.cross_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
        self.ff_norm = nn.LayerNorm(dim, eps=eps)
        if text:  # the text's tokens have a feed-forward of their own
            self.text_ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
            self.text_ff_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, image: torch.Tensor | None, *, queries: int, mask=None) -> torch.Tensor:
        """`h` `(N, Q + T, D_q)`: the `queries` query tokens (maybe none), then any text tokens."""
        h = self.self_attn_norm(h + self.dropout(self.self_attn(h, mask=mask)))
        q, text = h[:, :queries], h[:, queries:]  # (N, Q, D_q), (N, T, D_q)
        if queries:
            if hasattr(self, "cross_attn"):
                q = self.cross_attn_norm(q + self.dropout(self.cross_attn(q, image)))
            q = self.ff_norm(q + self.dropout(self.ff(q)))
        if text.shape[1]:
            text = self.text_ff_norm(text + self.dropout(self.text_ff(text)))
        return torch.cat([q, text], dim=1)  # (N, Q + T, D_q)


def attention_mask(pattern: str, num_queries: int, text_mask: torch.Tensor) -> torch.BoolTensor:
    """
    The self-attention mask of queries followed by text, `(N, 1, 1 or L, L)`, True where attending is allowed.

    Args:
        pattern (`str`): `"bidirectional"` (every position sees every query and every non-padding text token) or
            `"causal"` (queries see the queries only; text position t sees every query and text positions 0..t).
        num_queries (`int`): Q, the query positions in front (0 for text alone).
        text_mask (`torch.Tensor` of shape `(N, T)`): 1 for text tokens, 0 for padding.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"`pattern` must be one of {PATTERNS}, got {pattern!r}.")
    N, T = text_mask.shape
    Q, device = num_queries, text_mask.device
    keys = torch.cat([torch.ones(N, Q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)  # (N, L)
    if pattern == "bidirectional":
        return keys[:, None, None, :]  # (N, 1, 1, L)
    position = torch.arange(Q + T, device=device)
    row, column = position[:, None], position[None, :]  # (L, 1), (1, L)
    allowed = (column < Q) | ((row >= Q) & (column <= row))  # (L, L)
    return (allowed[None] & keys[:, None, :])[:, None]  # (N, 1, L, L)


class FusionQFormer(nn.Module):
    """Compresses image features `(N, V, D_v)` to `(N, Q, D_q)` with `Q` learned queries, and (with a vocabulary)
    reads text beside them or alone, in one of the attention patterns of [`attention_mask`]."""

    def __init__(self, *, num_queries: int, dim: int, depth: int, heads: int, ff_dim: int, context_dim: int,
                 cross_attention_frequency: int, eps: float, dropout: float, text_vocab_size: int | None = None,
                 text_max_positions: int = 512, text_pad_token_id: int = 0):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        if text_vocab_size:
            self.word_embeddings = nn.Embedding(text_vocab_size, dim, padding_idx=text_pad_token_id)
            self.position_embeddings = nn.Embedding(text_max_positions, dim)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(dim=dim, heads=heads, ff_dim=ff_dim, eps=eps, dropout=dropout, text=bool(text_vocab_size),
                         context_dim=context_dim if i % cross_attention_frequency == 0 else None)
            for i in range(depth)
        )

    def embed_text(self, text_ids: torch.LongTensor) -> torch.Tensor:
        """Word + position embeddings `(N, T, D_q)`; positions count from 0 whatever precedes the text."""
        T = text_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"The Q-Former reads at most {self.position_embeddings.num_embeddings} text tokens, got "
                             f"{T}.")
        positions = torch.arange(T, device=text_ids.device)
        return self.word_embeddings(text_ids) + self.position_embeddings(positions)  # (N, T, D_q)

    def forward(self, image_features: torch.Tensor | None, text_ids: torch.LongTensor | None = None,
                text_mask: torch.Tensor | None = None, *, pattern: str = "bidirectional") -> torch.Tensor:
        """
        Args:
            image_features (`torch.Tensor` of shape `(N, V, D_v)`, *optional*): what the queries read; `None` reads
                the text alone (no queries).
            text_ids, text_mask (`torch.Tensor` of shape `(N, T)`, *optional*): text in the Q-Former's vocabulary.
            pattern (`str`): how queries and text attend to each other when both are there (see `attention_mask`).

        Returns:
            `torch.Tensor` of shape `(N, Q + T, D_q)`: the queries' outputs, then the text's.
        """
        if image_features is None and text_ids is None:
            raise ValueError("The Q-Former needs image features, text, or both.")
        parts, N = [], len(image_features if image_features is not None else text_ids)
        if image_features is not None:
            parts.append(self.query_tokens.expand(N, -1, -1))  # (N, Q, D_q)
        Q, mask = (parts[0].shape[1] if parts else 0), None
        if text_ids is not None:
            parts.append(self.embed_text(text_ids).to(self.query_tokens.dtype))  # (N, T, D_q)
            text_mask = torch.ones_like(text_ids) if text_mask is None else text_mask
            mask = attention_mask(pattern, Q, text_mask)
        h = self.dropout(self.layernorm(torch.cat(parts, dim=1)))  # (N, L, D_q)
        for layer in self.layers:
            h = layer(h, image_features, queries=Q, mask=mask)
        return h


# ---- stage 1: heads, losses, the model ------------------------------------------------------------------------------
class QFormerTextHead(nn.Module):
    """ITG's prediction head (BERT's): dense + GELU + LayerNorm, then `decoder` over the vocabulary (its weight tied
    to the Q-Former's word embeddings)."""

    def __init__(self, *, dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h))))  # (N, T, D_q) -> (N, T, vocab)


@dataclass
class FusionBlip2ImageTextOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*, with `return_loss=True`): `loss_itc + loss_itm + loss_itg`.
    loss_itc, loss_itm, loss_itg (`torch.FloatTensor`, *optional*): the three stage-1 losses.
    logits_per_image (`torch.FloatTensor`): ITC, `(num_images, num_texts)`: each image's best query's cosine with each
        text, divided by the temperature (as CLIP's logits); with `use_image_text_matching_head=True`, the ITM logits
        `(batch_size, 2)` (column 1: the image and the text match), as transformers' `Blip2ForImageTextRetrieval`.
    logits_per_text (`torch.FloatTensor`): `logits_per_image` transposed.
    image_embeds (`torch.FloatTensor` of shape `(num_images, num_query_tokens, embed_dim)`): normalised, per query.
    text_embeds (`torch.FloatTensor` of shape `(num_texts, embed_dim)`): normalised.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every process's gradient of the gathered tensor and keeps this process's rows.
    (torch's `distributed.nn.functional.all_gather` sends its gradients through gloo as they lie in memory: a
    non-contiguous one, as einsum's backward gives, arrived scrambled, so two processes trained unlike one.)"""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.cat(out, dim=0)  # (W * b, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process's loss reaches every row
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b : (dist.get_rank() + 1) * b]


def gather(x: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """Every process's `x` `(b, ...)`, in rank order `(W * b, ...)`; with `grad`, gradients flow back to each owner."""
    rank, size = world()
    if size == 1:
        return x
    if grad:
        return _GatherWithGrad.apply(x.contiguous())
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def gather_padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """`gather` (no gradient) of `(b, T_rank)` token rows whose lengths differ between processes, padded with `pad`."""
    if world()[1] == 1:
        return x
    length = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    return gather(F.pad(x, (0, int(length) - x.shape[1]), value=pad), grad=False)


def global_sum(value: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def itc_loss(sim_i2t, sim_t2i, positives, label_smoothing: float) -> torch.Tensor:
    """Image->text and text->image cross-entropy over `(b, B)` logits; `positives` `(b, B)` marks each row's positive
    columns (the captions of the same image), which share the target."""
    targets = positives.float() / positives.sum(1, keepdim=True)  # (b, B)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


def draw_negatives(sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
    """For each row of `sim` `(B, B)`, a column drawn with weight softmax(sim) + 1e-4, its positive columns at 0
    (BLIP-2's hard negatives, weighted as LAVIS 1.0.2 weighs them)."""
    if bool(positives.all(1).any()):
        raise ValueError("ITM needs, for every sample, another image in the global batch: this batch holds a single "
                         "image (or every caption in it belongs to one image).")
    weights = (F.softmax(sim.float(), dim=1) + 1e-4).masked_fill(positives, 0.0)  # (B, B)
    if generator is not None and generator.device != weights.device:  # the trainer's generator is a CPU one
        return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(weights.device)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)  # (B,)


class FusionBlip2ForImageTextRetrieval(FusionPreTrainedModel):
    r"""
    BLIP-2's stage 1 for any vision tower: the tower, a layer norm, the Q-Former with its text side, and the stage-1
    heads — ITC projections (`vision_projection`, `text_projection`, `temperature`), `itm_head`, and `text_head` (ITG).
    No LM. Its forward follows transformers' `Blip2ForImageTextRetrieval`; `return_loss=True` adds BLIP-2's three
    losses. What `AutoModel` and `AutoModelForZeroShotImageClassification` build for `fusion_blip2_qformer`.

    Example:

    ```python
    >>> import torch
    >>> from vlm_fusion import FusionBlip2ForImageTextRetrieval, FusionBlip2QFormerConfig
    >>> from vlm_fusion.tools.tiny import tiny_vision_config
    >>> config = FusionBlip2QFormerConfig(vision_config=tiny_vision_config("siglip"), num_query_tokens=8,
    ...                                   qformer_hidden_size=64, qformer_num_hidden_layers=2,
    ...                                   qformer_num_attention_heads=4, qformer_intermediate_size=128,
    ...                                   qformer_vocab_size=100, qformer_bos_token_id=99, embed_dim=32)
    >>> model = FusionBlip2ForImageTextRetrieval(config).eval()
    >>> out = model(pixel_values=torch.randn(2, 3, 32, 32), input_ids=torch.tensor([[1, 5, 6], [1, 7, 8]]))
    >>> out.logits_per_image.shape
    torch.Size([2, 2])
    ```
    """

    config_class = FusionBlip2QFormerConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    _no_split_modules = ["QFormerLayer"]
    _keep_in_fp32_modules_strict = ["qformer", "text_head"]  # post-norm layers with eps 1e-12: fp32 under fp16 and bf16
    # alike; `text_head` too, its decoder being the Q-Former's (fp32) word embeddings: in bf16 its dense / norm / bias
    # met that fp32 decoder and the Q-Former's fp32 states, and `return_loss=True` failed with a dtype mismatch
    _tied_weights_keys = {"text_head.decoder.weight": "qformer.word_embeddings.weight"}
    _bridge_modules = ["vision_layernorm", "qformer", "vision_projection", "text_projection", "itm_head", "text_head"]
    _bridge_parameters = ["temperature"]
    _unquantized_modules = [r"vision_tower", *_bridge_modules]
    legacy_parts_layout = False  # no checkpoint of this class was ever written in the parts layout

    def __init__(self, config: FusionBlip2QFormerConfig, *, vision_tower=None):
        super().__init__(config)
        if vision_tower is not None:
            _mark_initialized(vision_tower)
        self.vision_tower = vision_tower if vision_tower is not None else build_vision_tower(config.vision_config)
        self.config.vision_config = self.vision_tower.config
        vision_dim, dim = config.vision_config.hidden_size, config.qformer_hidden_size
        self.vision_layernorm = nn.LayerNorm(vision_dim, eps=config.vision_layer_norm_eps)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # `_keep_in_fp32_modules_strict`: fp32 whatever the model is built in
        try:
            self.qformer = FusionQFormer(
                num_queries=config.num_query_tokens, dim=dim, depth=config.qformer_num_hidden_layers,
                heads=config.qformer_num_attention_heads, ff_dim=config.qformer_intermediate_size,
                context_dim=vision_dim, cross_attention_frequency=config.cross_attention_frequency,
                eps=config.qformer_layer_norm_eps, dropout=config.qformer_dropout,
                text_vocab_size=config.qformer_vocab_size, text_max_positions=config.qformer_max_position_embeddings,
                text_pad_token_id=config.qformer_pad_token_id,
            )
        finally:
            torch.set_default_dtype(previous)
        self.vision_projection = nn.Linear(dim, config.embed_dim)
        self.text_projection = nn.Linear(dim, config.embed_dim)
        self.itm_head = nn.Linear(dim, 2)
        self.text_head = QFormerTextHead(dim=dim, vocab_size=config.qformer_vocab_size,
                                         eps=config.qformer_layer_norm_eps).float()  # fp32, as its tied decoder
        self.temperature = nn.Parameter(torch.full((1,), float(config.temperature)))  # (1,): FSDP2 shards no scalar
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FusionQFormer):
            init.normal_(module.query_tokens, std=0.02)
        if module is self:
            init.constant_(self.temperature, float(self.config.temperature))

    def modules_inside_backbones(self) -> list[nn.Module]:
        return []

    def get_input_embeddings(self):
        return self.qformer.word_embeddings

    def set_input_embeddings(self, value):
        self.qformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.text_head.decoder

    # ---- training parts (what `vlm-fusion train` freezes and gives learning rates) ------------------------------
    def bridge_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self._bridge_modules}

    def parameter_parts(self) -> dict[str, dict[str, nn.Parameter]]:
        """`vision_tower`; `bridge`: the layer norm, the Q-Former and the stage-1 heads; no `language_model`."""
        parts = {"vision_tower": {}, "bridge": {}, "language_model": {}}
        for name, parameter in self.named_parameters():
            parts["vision_tower" if name.startswith("vision_tower.") else "bridge"][name] = parameter
        return parts

    # ---- the two sides ---------------------------------------------------------------------------------------------
    def get_vision_embeddings(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """What the queries cross-attend to: the tower's features, layer-normed, `(num_images, V, vision_hidden_size)`."""
        features, _ = select_image_features(self.vision_tower, pixel_values, layer=self.config.vision_feature_layer,
                                            strategy=self.config.vision_feature_select_strategy)
        features = self.vision_layernorm(features.to(self.vision_layernorm.weight.dtype))
        return features.to(self.qformer.query_tokens.dtype)  # (N, V, D_v)

    def get_image_features(self, pixel_values: torch.FloatTensor | None = None, *,
                           vision_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised ITC embeddings of the images, one per query, `(num_images, num_query_tokens, embed_dim)`;
        from the pixels or from `get_vision_embeddings`' output."""
        if vision_embeds is None:
            vision_embeds = self.get_vision_embeddings(pixel_values)
        queries = self.qformer(vision_embeds)  # (N, Q, D_q)
        return F.normalize(self.vision_projection(queries.to(self.vision_projection.weight.dtype)), dim=-1)

    def get_text_features(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised ITC embeddings of the texts (their first token's output), `(num_texts, embed_dim)`."""
        text = self.qformer(None, input_ids, attention_mask)  # (N, T, D_q)
        return F.normalize(self.text_projection(text[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    def image_text_matching(self, vision_embeds: torch.Tensor, input_ids: torch.LongTensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits `(N, 2)` of image–text pairs (column 1: they match), from `get_vision_embeddings`' output."""
        h = self.qformer(vision_embeds, input_ids, attention_mask, pattern="bidirectional")  # (N, Q + T, D_q)
        queries = h[:, : self.config.num_query_tokens]  # (N, Q, D_q)
        return self.itm_head(queries.to(self.itm_head.weight.dtype)).mean(dim=1)  # (N, 2)

    def text_generation_logits(self, vision_embeds: torch.Tensor, input_ids: torch.LongTensor,
                               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """ITG logits `(N, T, qformer_vocab_size)` of captions conditioned on the images (causal pattern); the first
        token should be `[DEC]` (`config.qformer_bos_token_id`)."""
        h = self.qformer(vision_embeds, input_ids, attention_mask, pattern="causal")  # (N, Q + T, D_q)
        return self.text_head(h[:, self.config.num_query_tokens:])  # (N, T, vocab)

    @property
    def clamped_temperature(self) -> torch.Tensor:
        return self.temperature.clamp(*TEMPERATURE_RANGE)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.FloatTensor, input_ids: torch.LongTensor,
                attention_mask: torch.Tensor | None = None, use_image_text_matching_head: bool = False,
                return_loss: bool = False, image_ids: torch.LongTensor | None = None,
                negatives_generator: torch.Generator | None = None,
                negative_image_index: torch.LongTensor | None = None,
                negative_text_index: torch.LongTensor | None = None,
                return_dict: bool | None = None) -> FusionBlip2ImageTextOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`).
        input_ids, attention_mask (`torch.Tensor` of shape `(num_texts, sequence_length)`): captions in the
            Q-Former's vocabulary, `[CLS]` first (the processor makes them).
        use_image_text_matching_head (`bool`): ITM logits of each (image, text) pair instead of ITC logits (one image
            and several texts, or several images and one text, are paired with each other).
        return_loss (`bool`): BLIP-2's stage-1 losses on a batch of (image, caption) pairs, over every process's batch.
        image_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*): which image each pair shows: the
            captions of one image are all positives in ITC and never its ITM negatives (default: all different).
        negatives_generator (`torch.Generator`, *optional*): the generator ITM's negatives are drawn with.
        negative_image_index, negative_text_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): ITM's
            negatives given instead of drawn, as indices into the global batch.
        """
        if return_loss:
            return self.stage1_loss(pixel_values, input_ids, attention_mask, image_ids=image_ids,
                                    generator=negatives_generator, negative_image_index=negative_image_index,
                                    negative_text_index=negative_text_index)
        vision_embeds = self.get_vision_embeddings(pixel_values)
        if use_image_text_matching_head:
            if len(vision_embeds) != len(input_ids):
                if min(len(vision_embeds), len(input_ids)) != 1:
                    raise ValueError(f"ITM pairs images with texts: got {len(vision_embeds)} images and "
                                     f"{len(input_ids)} texts (give as many, or one of either).")
                size = max(len(vision_embeds), len(input_ids))
                vision_embeds = vision_embeds.expand(size, -1, -1)
                input_ids = input_ids.expand(size, -1)
                attention_mask = None if attention_mask is None else attention_mask.expand(size, -1)
            logits = self.image_text_matching(vision_embeds, input_ids, attention_mask)  # (N, 2)
            return FusionBlip2ImageTextOutput(logits_per_image=logits, logits_per_text=logits.t())
        image_embeds = self.get_image_features(vision_embeds=vision_embeds)  # (N_i, Q, E)
        text_embeds = self.get_text_features(input_ids, attention_mask)  # (N_t, E)
        similarity = torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(-1)  # (N_i, N_t)
        logits = similarity / self.clamped_temperature
        return FusionBlip2ImageTextOutput(logits_per_image=logits, logits_per_text=logits.t(),
                                          image_embeds=image_embeds, text_embeds=text_embeds)

    def stage1_loss(self, pixel_values, input_ids, attention_mask=None, *, image_ids=None, generator=None,
                    negative_image_index=None, negative_text_index=None) -> FusionBlip2ImageTextOutput:
        """ITC + ITM + ITG on `b` (image, caption) pairs per process (see the module's docstring)."""
        rank, size = world()
        b = len(input_ids)
        if len(pixel_values) != b:
            raise ValueError(f"Stage 1 takes (image, caption) pairs: got {len(pixel_values)} images, {b} captions.")
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if image_ids is None:  # every pair its own image
            image_ids = torch.arange(b, device=input_ids.device) + rank * b
        ids_all = gather(image_ids.to(input_ids.device), grad=False)  # (B,)
        if len(ids_all) < 2:
            raise ValueError("ITC contrasts each image with the other captions of the batch: a global batch of one "
                             "pair has none (use a batch of at least 2).")
        smoothing = self.config.label_smoothing
        vision = self.get_vision_embeddings(pixel_values)  # (b, V, D_v)

        # ITC: local rows against every process's columns
        image_feats = self.get_image_features(vision_embeds=vision)  # (b, Q, E)
        text_feat = self.get_text_features(input_ids, attention_mask)  # (b, E)
        image_feats_all, text_feat_all = gather(image_feats, grad=True), gather(text_feat, grad=True)  # (B, Q, E), (B, E)
        temperature = self.clamped_temperature
        sim_i2t = torch.einsum("iqe,te->itq", image_feats, text_feat_all).amax(-1) / temperature  # (b, B)
        sim_t2i = torch.einsum("te,iqe->tiq", text_feat, image_feats_all).amax(-1) / temperature  # (b, B)
        positives = image_ids.to(ids_all.device)[:, None] == ids_all[None, :]  # (b, B)
        loss_itc = itc_loss(sim_i2t, sim_t2i, positives, smoothing)

        # ITM: hard negatives drawn over the global batch, the same draws whatever the number of processes
        mine = slice(rank * b, (rank + 1) * b)
        if negative_image_index is None or negative_text_index is None:
            with torch.no_grad():
                positives_all = ids_all[:, None] == ids_all[None, :]  # (B, B)
                negative_image_index = draw_negatives(gather(sim_t2i.detach(), grad=False), positives_all, generator)
                negative_text_index = draw_negatives(gather(sim_i2t.detach(), grad=False), positives_all, generator)
            negative_image_index, negative_text_index = negative_image_index[mine], negative_text_index[mine]
        pad = self.config.qformer_pad_token_id
        texts_all, masks_all = gather_padded(input_ids, pad), gather_padded(attention_mask, 0)  # (B, T')
        T = max(input_ids.shape[1], texts_all.shape[1])
        negative_texts = F.pad(texts_all[negative_text_index], (0, T - texts_all.shape[1]), value=pad)  # (b, T)
        negative_masks = F.pad(masks_all[negative_text_index], (0, T - masks_all.shape[1]), value=0)
        own_texts = F.pad(input_ids, (0, T - input_ids.shape[1]), value=pad)
        own_masks = F.pad(attention_mask, (0, T - attention_mask.shape[1]), value=0)
        negative_images = gather(vision, grad=True)[negative_image_index]  # (b, V, D_v)
        itm_logits = self.image_text_matching(
            torch.cat([vision, negative_images, vision]),  # (3b, V, D_v): positive, negative image, positive
            torch.cat([own_texts, own_texts, negative_texts]),  # (3b, T): positive, positive, negative text
            torch.cat([own_masks, own_masks, negative_masks]),
        )  # (3b, 2)
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(itm_logits.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: the caption after [DEC], every query in view; a token mean over the global batch
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.qformer_bos_token_id
        labels = decoder_ids.masked_fill(attention_mask == 0, -100)[:, 1:]  # (b, T - 1)
        logits = self.text_generation_logits(vision, decoder_ids, attention_mask)[:, :-1]  # (b, T - 1, vocab)
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                label_smoothing=smoothing, reduction="sum")
        tokens = global_sum((labels != -100).sum().to(total.device)).clamp(min=1)
        loss_itg = total * size / tokens  # averaged over processes (DDP, FSDP): the global token mean

        return FusionBlip2ImageTextOutput(
            loss=loss_itc + loss_itm + loss_itg, loss_itc=loss_itc.detach(), loss_itm=loss_itm.detach(),
            loss_itg=loss_itg.detach(), logits_per_image=sim_i2t, logits_per_text=sim_t2i,
            image_embeds=image_feats, text_embeds=text_feat,
        )


# ---- starting from BERT, as BLIP-2's stage 1 does --------------------------------------------------------------------
# One Q-Former layer, transformers' names -> ours. LAVIS differs only by `attention.self` for `attention.attention`.
# (The BLIP-2 conversion scripts build their tables from these too.)
QFORMER_LAYER_RULES = [
    (r"attention\.(?:attention|self)\.query\.", "self_attn.to_q."),
    (r"attention\.(?:attention|self)\.key\.", "self_attn.to_k."),
    (r"attention\.(?:attention|self)\.value\.", "self_attn.to_v."),
    (r"attention\.output\.dense\.", "self_attn.to_out."),
    (r"attention\.output\.LayerNorm\.", "self_attn_norm."),
    (r"crossattention\.(?:attention|self)\.query\.", "cross_attn.to_q."),
    (r"crossattention\.(?:attention|self)\.key\.", "cross_attn.to_k."),
    (r"crossattention\.(?:attention|self)\.value\.", "cross_attn.to_v."),
    (r"crossattention\.output\.dense\.", "cross_attn.to_out."),
    (r"crossattention\.output\.LayerNorm\.", "cross_attn_norm."),
    (r"intermediate_query\.dense\.", "ff.0."),
    (r"output_query\.dense\.", "ff.2."),
    (r"output_query\.LayerNorm\.", "ff_norm."),
]


# The text's own feed-forward in a layer (BERT's, which the queries' `*_query` copy starts from).
QFORMER_TEXT_LAYER_RULES = [
    (r"intermediate\.dense\.", "text_ff.0."),
    (r"output\.dense\.", "text_ff.2."),
    (r"output\.LayerNorm\.", "text_ff_norm."),
]


def qformer_rules(layer_prefix: str, text: bool = False) -> list[tuple[str, str | None]]:
    """A Q-Former's layers; its text feed-forward kept with `text`, else dropped on purpose (BLIP-2 generation does
    not use it)."""
    rules = [(rf"^{layer_prefix}(\d+)\.{src}", rf"qformer.layers.\1.{dst}") for src, dst in QFORMER_LAYER_RULES]
    if text:
        return rules + [(rf"^{layer_prefix}(\d+)\.{src}", rf"qformer.layers.\1.{dst}")
                        for src, dst in QFORMER_TEXT_LAYER_RULES]
    return rules + [(rf"^{layer_prefix}\d+\.(?:intermediate|output)\.", None)]


def bert_rules() -> list[tuple[str, str | None]]:
    """A BERT checkpoint (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`) -> the Q-Former's text side, as
    BLIP-2's stage 1 starts from bert-base-uncased: embeddings (no token types), self-attention, the text FFN, and the
    masked-LM head as ITG's `text_head` (its decoder weight is the word embeddings)."""
    return [
        (r"^(?:bert\.)?embeddings\.word_embeddings\.", "qformer.word_embeddings."),
        (r"^(?:bert\.)?embeddings\.position_embeddings\.", "qformer.position_embeddings."),
        (r"^(?:bert\.)?embeddings\.LayerNorm\.", "qformer.layernorm."),
        (r"^(?:bert\.)?embeddings\.(?:token_type_embeddings\.|position_ids|token_type_ids)", None),
        *qformer_rules(r"(?:bert\.)?encoder\.layer\.", text=True),
        (r"^(?:bert\.)?pooler\.", None),
        (r"^cls\.predictions\.transform\.dense\.", "text_head.dense."),
        (r"^cls\.predictions\.transform\.LayerNorm\.", "text_head.norm."),
        (r"^cls\.predictions\.bias$", "text_head.decoder.bias"),
        (r"^cls\.predictions\.decoder\.", None),  # weight: the word embeddings; bias: `cls.predictions.bias`
        (r"^cls\.seq_relationship\.", None),
    ]


def qformer_from_bert(model, path: str) -> dict[str, int]:
    """
    Start `model`'s Q-Former (a [`FusionBlip2ForImageTextRetrieval`]) from the BERT checkpoint at `path`, as BLIP-2
    does: every BERT tensor but the token types and the pooler; each layer's query FFN a copy of its text FFN;
    cross-attention, queries, projections and the ITM head stay as initialised. A vocabulary grown by `[DEC]` keeps
    its new rows. Returns how many tensors were taken and how many stay new.
    """
    source = rename_keys(read_state_dict(path), bert_rules())
    for key in [k for k in source if ".text_ff" in k]:  # BLIP-2: the `*_query` FFN starts as a copy of BERT's
        source[key.replace(".text_ff", ".ff")] = source[key].clone()
    own = model.state_dict()
    unknown = [k for k in source if k not in own]
    if unknown:
        raise ConversionError(f"{path} holds tensors this Q-Former has no place for: {preview(unknown)}")
    with torch.no_grad():
        for key, tensor in source.items():
            target = own[key]
            if key.endswith(("word_embeddings.weight", "decoder.bias")) and tensor.shape[0] <= target.shape[0] \
                    and tensor.shape[1:] == target.shape[1:]:
                target[: tensor.shape[0]].copy_(tensor)  # BERT's vocabulary; [DEC] after it keeps its init
            elif tensor.shape != target.shape:
                raise ConversionError(f"{key}: {tuple(tensor.shape)} in {path}, {tuple(target.shape)} in the Q-Former "
                                      "(build it with the BERT config's sizes)")
            else:
                target.copy_(tensor)
    return {"from_bert": len(source),
            "new": len([k for k in own if k not in source and not k.startswith("vision_tower.")])}
