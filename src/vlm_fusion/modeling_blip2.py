"""The BLIP-2-style family: a Q-Former turns an image's patch features into N_q tokens for the LM.

Q-Former (BERT-style, post-norm): learned queries Q (1, N_q, D_q), layer-normed, then per layer
    h = LN(h + SelfAttn(h))
    h = LN(h + CrossAttn(h, image))        in layers 0, f, 2f, ... (f = cross_attention_frequency)
    h = LN(h + FFN(h))
and `language_projection` maps D_q to the LM width. The N_q tokens take the `<image>` positions of the text.

Legend: N images, V vision tokens per image, Q = N_q queries, D_v vision width, D_q Q-Former width, D LM width,
H heads, d head width.
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        N, Q, D = x.shape
        S, H = context.shape[1], self.heads
        q = self.to_q(x).view(N, Q, H, D // H).transpose(1, 2)  # (N, H, Q, d)
        k = self.to_k(context).view(N, S, H, D // H).transpose(1, 2)  # (N, H, S, d)
        v = self.to_v(context).view(N, S, H, D // H).transpose(1, 2)  # (N, H, S, d)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(N, Q, D))  # (N, H, Q, d) -> (N, Q, D_q)


class QFormerLayer(nn.Module):
    def __init__(self, *, dim: int, heads: int, ff_dim: int, context_dim: int | None, eps: float, dropout: float):
        super().__init__()
        self.self_attn = QFormerAttention(dim=dim, context_dim=dim, heads=heads, dropout=dropout)
        self.self_attn_norm = nn.LayerNorm(dim, eps=eps)
        if context_dim is not None:
            self.cross_attn = QFormerAttention(dim=dim, context_dim=context_dim, heads=heads, dropout=dropout)
            self.cross_attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
        self.ff_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_norm(h + self.dropout(self.self_attn(h)))
        if hasattr(self, "cross_attn"):
            h = self.cross_attn_norm(h + self.dropout(self.cross_attn(h, image)))
        return self.ff_norm(h + self.dropout(self.ff(h)))


class FusionQFormer(nn.Module):
    """Compresses image features `(N, V, D_v)` to `(N, Q, D_q)` with `Q` learned queries."""

    def __init__(self, *, num_queries: int, dim: int, depth: int, heads: int, ff_dim: int, context_dim: int,
                 cross_attention_frequency: int, eps: float, dropout: float):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(dim=dim, heads=heads, ff_dim=ff_dim, eps=eps, dropout=dropout,
                         context_dim=context_dim if i % cross_attention_frequency == 0 else None)
            for i in range(depth)
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        N = image_features.shape[0]
        h = self.dropout(self.layernorm(self.query_tokens.expand(N, -1, -1)))  # (N, Q, D_q)
        for layer in self.layers:
            h = layer(h, image_features)
        return h


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
    _unquantized_modules = FusionModel._unquantized_modules + [rf"(?:model\.)?{name}" for name in _bridge_modules]

    def __init__(self, config: FusionBlip2Config, **parts):
        super().__init__(config, **parts)
        vision_dim = config.vision_config.hidden_size
        self.vision_layernorm = nn.LayerNorm(vision_dim, eps=config.vision_layer_norm_eps)
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
        )
        self.language_projection = nn.Linear(config.qformer_hidden_size, config.text_config.hidden_size)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FusionQFormer):
            init.normal_(module.query_tokens, std=0.02)

    def encode_images(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        features = self.vision_layernorm(features.to(self.vision_layernorm.weight.dtype))  # (N, V, D_v)
        queries = self.qformer(features.to(self.qformer.query_tokens.dtype))  # (N, Q, D_q), fp32 under any dtype
        return self.language_projection(queries.to(self.language_projection.weight.dtype))  # (N, Q, D)


class FusionBlip2ForConditionalGeneration(FusionForConditionalGeneration, GenerationMixin):
    """[`FusionBlip2Model`] with the LM's head: what `AutoModelForImageTextToText` builds for `fusion_blip2`."""

    config_class = FusionBlip2Config
    model_class = FusionBlip2Model
