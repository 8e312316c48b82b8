"""The BLIP-2-style family: a Q-Former turns an image's patch features into N_q tokens for the LM.

Q-Former (BERT-style, post-norm): learned queries Q (1, N_q, D_q), layer-normed, then per layer
    h = LN(h + SelfAttn(h))
    h = LN(h + CrossAttn(h, image))        in layers 0, f, 2f, ... (f = cross_attention_frequency)
    h = LN(h + FFN(h))
and `language_projection` maps D_q to the LM width. The N_q tokens take the `<image>` positions of the text.

Instruction-aware (InstructBLIP, `qformer_text_input`): the instruction's tokens (the Q-Former's own vocabulary,
word + position embeddings) follow the queries, h = [queries; text] (N, Q + T, D_q); self-attention runs over
both (padding masked), cross-attention over the queries only, and the text has its own FFN. Only the queries go on.

Legend: N images, V vision tokens per image, Q = N_q queries, T instruction tokens, D_v vision width, D_q Q-Former
width, D LM width, H heads, d head width.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init

from .configuration_blip2 import FusionBlip2Config
from .modeling_base import FusionForConditionalGeneration, FusionModel


class QFormerAttention(nn.Module):
    """Multi-head attention of `x` `(N, Q, D_q)` over `context` `(N, S, context_dim)` (itself for self-attention)."""

    def __init__(self, *, dim: int, context_dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.BoolTensor | None = None):
        """`mask` `(N, 1, 1, S)`: which of the context's positions may be attended to (padding excluded)."""
        context = x if context is None else context
        N, Q, D = x.shape
        S, H = context.shape[1], self.heads
        q = self.to_q(x).view(N, Q, H, D // H).transpose(1, 2)  # (N, H, Q, d)
        k = self.to_k(context).view(N, S, H, D // H).transpose(1, 2)  # (N, H, S, d)
        v = self.to_v(context).view(N, S, H, D // H).transpose(1, 2)  # (N, H, S, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(N, Q, D))  # (N, H, Q, d) -> (N, Q, D_q)


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
        if text:  # the instruction's tokens have a feed-forward of their own
            self.text_ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
            self.text_ff_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, image: torch.Tensor, *, queries: int, mask=None) -> torch.Tensor:
        """`h` `(N, Q + T, D_q)`: the `queries` query tokens, then any instruction tokens."""
        h = self.self_attn_norm(h + self.dropout(self.self_attn(h, mask=mask)))
        q, text = h[:, :queries], h[:, queries:]  # (N, Q, D_q), (N, T, D_q)
        if hasattr(self, "cross_attn"):
            q = self.cross_attn_norm(q + self.dropout(self.cross_attn(q, image)))
        q = self.ff_norm(q + self.dropout(self.ff(q)))
        if not text.shape[1]:
            return q
        text = self.text_ff_norm(text + self.dropout(self.text_ff(text)))
        return torch.cat([q, text], dim=1)  # (N, Q + T, D_q)


class FusionQFormer(nn.Module):
    """Compresses image features `(N, V, D_v)` to `(N, Q, D_q)` with `Q` learned queries (and, instruction-aware,
    reads the instruction's tokens beside them)."""

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

    def forward(self, image_features: torch.Tensor, text_ids: torch.LongTensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`text_ids` / `text_mask` `(N, T)`: each image's instruction, in the Q-Former's vocabulary."""
        N = image_features.shape[0]
        h = self.query_tokens.expand(N, -1, -1)  # (N, Q, D_q)
        Q, mask = h.shape[1], None
        if text_ids is not None:
            T = text_ids.shape[1]
            if T > self.position_embeddings.num_embeddings:
                raise ValueError(f"The Q-Former reads at most {self.position_embeddings.num_embeddings} instruction "
                                 f"tokens, got {T}.")
            positions = torch.arange(T, device=text_ids.device)
            text = self.word_embeddings(text_ids) + self.position_embeddings(positions)  # (N, T, D_q)
            h = torch.cat([h, text.to(h.dtype)], dim=1)  # (N, Q + T, D_q)
            keep = torch.ones(N, Q, dtype=torch.bool, device=text_ids.device)
            text_mask = torch.ones_like(text_ids) if text_mask is None else text_mask
            mask = torch.cat([keep, text_mask.bool()], dim=1)[:, None, None, :]  # (N, 1, 1, Q + T)
        h = self.dropout(self.layernorm(h))
        for layer in self.layers:
            h = layer(h, image_features, queries=Q, mask=mask)
        return h[:, :Q]  # (N, Q, D_q)


class FusionBlip2Model(FusionModel):
    r"""
    A vision tower, a layer norm, a Q-Former and a linear projection in front of the LM's base decoder (no head): each
    image becomes `num_query_tokens` tokens, whatever its resolution, placed at the `<image>` positions of the text.

    Example:

    ```python
    >>> import torch
    >>> from vlm_fusion import FusionBlip2Config, FusionBlip2Model
    >>> from vlm_fusion.tools.tiny import tiny_text_config, tiny_vision_config
    >>> config = FusionBlip2Config(vision_config=tiny_vision_config("siglip"), text_config=tiny_text_config("gpt2"),
    ...                            num_query_tokens=8, qformer_hidden_size=64, qformer_num_hidden_layers=2,
    ...                            qformer_num_attention_heads=4, qformer_intermediate_size=128, image_token_id=128)
    >>> model = FusionBlip2Model(config)
    >>> model.get_image_features(torch.randn(2, 3, 32, 32)).pooler_output.shape
    torch.Size([2, 8, 64])
    ```
    """

    config_class = FusionBlip2Config
    _no_split_modules = ["QFormerLayer"]
    _keep_in_fp32_modules_strict = ["qformer"]  # post-norm layers with eps 1e-12: fp32 under fp16 and bf16 alike
    _bridge_modules = ["vision_layernorm", "qformer", "language_projection"]
    _image_inputs = ("qformer_input_ids", "qformer_attention_mask")  # InstructBLIP's instruction, per sample
    _unquantized_modules = FusionModel._unquantized_modules + [rf"(?:model\.)?{name}" for name in _bridge_modules]

    def __init__(self, config: FusionBlip2Config, **parts):
        super().__init__(config, **parts)
        vision_dim = config.vision_config.hidden_size
        self.vision_layernorm = nn.LayerNorm(vision_dim, eps=config.vision_layer_norm_eps)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # `_keep_in_fp32_modules_strict`: fp32 whatever the model is built in
        try:
            self.qformer = FusionQFormer(
                num_queries=config.num_query_tokens,
                dim=config.qformer_hidden_size,
                depth=config.qformer_num_hidden_layers,
                heads=config.qformer_num_attention_heads,
                ff_dim=config.qformer_intermediate_size,
                context_dim=vision_dim,
                cross_attention_frequency=config.cross_attention_frequency,
                eps=config.qformer_layer_norm_eps,
                dropout=config.qformer_dropout,
                text_vocab_size=config.qformer_vocab_size if config.qformer_text_input else None,
                text_max_positions=config.qformer_max_position_embeddings,
                text_pad_token_id=config.qformer_pad_token_id,
            )
        finally:
            torch.set_default_dtype(previous)
        self.language_projection = nn.Linear(config.qformer_hidden_size, config.text_config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FusionQFormer):
            init.normal_(module.query_tokens, std=0.02)

    def encode_images(self, features: torch.Tensor, qformer_input_ids: torch.LongTensor | None = None,
                      qformer_attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`qformer_input_ids` / `qformer_attention_mask` `(N, T)`: each image's instruction (instruction-aware only)."""
        if self.config.qformer_text_input and qformer_input_ids is None:
            raise ValueError("This model's Q-Former reads the instruction: pass `qformer_input_ids` (the processor "
                             "makes them) with the images.")
        if not self.config.qformer_text_input and qformer_input_ids is not None:
            raise ValueError("`qformer_input_ids` were given, but this model's Q-Former reads no text "
                             "(`qformer_text_input=False`).")
        features = self.vision_layernorm(features.to(self.vision_layernorm.weight.dtype))  # (N, V, D_v)
        queries = self.qformer(features.to(self.qformer.query_tokens.dtype), qformer_input_ids,
                               qformer_attention_mask)  # (N, Q, D_q), fp32 under any dtype
        return self.language_projection(queries.to(self.language_projection.weight.dtype))  # (N, Q, D)

    def blank_image_inputs(self) -> dict:
        inputs = super().blank_image_inputs()
        if self.config.qformer_text_input:  # an empty instruction: its one pad token
            device = inputs["pixel_values"].device
            inputs["qformer_input_ids"] = torch.full((1, 1), self.config.qformer_pad_token_id, device=device)
            inputs["qformer_attention_mask"] = torch.ones(1, 1, dtype=torch.long, device=device)
        return inputs

    def embed_inputs(self, input_ids, inputs_embeds, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """The instruction is given per sample `(B, T)`; each image reads its own sample's."""
        if qformer_input_ids is not None and pixel_values is not None and len(pixel_values) != len(qformer_input_ids):
            image_mask = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, T)
            per_sample = torch.as_tensor(self.images_per_sample(image_mask, len(pixel_values)))
            qformer_input_ids = qformer_input_ids.repeat_interleave(per_sample.to(qformer_input_ids.device), dim=0)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(
                    per_sample.to(qformer_attention_mask.device), dim=0)
        image_kwargs = {}
        if qformer_input_ids is not None:
            image_kwargs = {"qformer_input_ids": qformer_input_ids, "qformer_attention_mask": qformer_attention_mask}
        return super().embed_inputs(input_ids, inputs_embeds, pixel_values, **image_kwargs)


class FusionBlip2ForConditionalGeneration(FusionForConditionalGeneration, GenerationMixin):
    """[`FusionBlip2Model`] with the LM's head: what `AutoModelForImageTextToText` builds for `fusion_blip2`."""

    config_class = FusionBlip2Config
    model_class = FusionBlip2Model
