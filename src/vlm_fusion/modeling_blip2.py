"""The BLIP-2-style family: a Q-Former turns an image's patch features into N_q tokens for the LM.

The Q-Former (`modeling_qformer.py`) reads the image's patch features with its N_q learned queries, and
`language_projection` maps its width D_q to the LM width. The N_q tokens take the `<image>` positions of the text.

Instruction-aware (InstructBLIP, `qformer_text_input`): the instruction's tokens (the Q-Former's own vocabulary)
follow the queries and attend to them both ways (the Q-Former's `bidirectional` pattern); only the queries go on.

Videos (`video_bridge`): every frame goes through the Q-Former as an image does, reading its sample's instruction.
`per_frame` (InstructBLIP-Video) projects each frame's N_q outputs and puts them side by side, F x N_q tokens;
`video_qformer` (Video-LLaMA) adds a learned frame-position embedding to each frame's outputs and a second, small
Q-Former (`video_qformer`, its own `num_video_query_tokens` queries) cross-attends to all F x N_q of them, then
`video_projection` maps its outputs to the LM: N_vq tokens per clip.

Legend: N images, V vision tokens per image, Q = N_q queries, T instruction tokens, D_v vision width, D_q Q-Former
width, D LM width, H heads, d head width; for clips C clips, F frames per clip, N_vq video queries.
"""

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as init

from .configuration_blip2 import FusionBlip2Config
from .modeling_base import FusionForConditionalGeneration, FusionModel
from .modeling_qformer import FusionQFormer


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
    # post-norm layers with eps 1e-12: fp32 under fp16 and bf16 alike
    _keep_in_fp32_modules_strict = ["qformer", "video_qformer"]
    # the last three only with `video_bridge="video_qformer"` (see `bridge_modules`)
    _bridge_modules = ["vision_layernorm", "qformer", "language_projection", "frame_position_embedding",
                       "video_qformer", "video_projection"]
    _image_inputs = ("qformer_input_ids", "qformer_attention_mask")  # InstructBLIP's instruction, per sample
    _video_inputs = ("qformer_input_ids", "qformer_attention_mask")  # read with every frame of the sample's clips
    _unquantized_modules = FusionModel._unquantized_modules + [rf"(?:model\.)?{name}" for name in _bridge_modules]

    def __init__(self, config: FusionBlip2Config, **parts):
        super().__init__(config, **parts)
        vision_dim = config.vision_config.hidden_size
        self.vision_layernorm = nn.LayerNorm(vision_dim, eps=config.vision_layer_norm_eps)
        shape = dict(dim=config.qformer_hidden_size, heads=config.qformer_num_attention_heads,
                     ff_dim=config.qformer_intermediate_size, eps=config.qformer_layer_norm_eps,
                     dropout=config.qformer_dropout)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # `_keep_in_fp32_modules_strict`: fp32 whatever the model is built in
        try:
            self.qformer = FusionQFormer(
                num_queries=config.num_query_tokens,
                depth=config.qformer_num_hidden_layers,
                context_dim=vision_dim,
                cross_attention_frequency=config.cross_attention_frequency,
                text_vocab_size=config.qformer_vocab_size if config.qformer_text_input else None,
                text_max_positions=config.qformer_max_position_embeddings,
                text_pad_token_id=config.qformer_pad_token_id,
                **shape,
            )
            if config.video_bridge == "video_qformer":  # Video-LLaMA: reads the frames' query outputs, no text
                self.video_qformer = FusionQFormer(num_queries=config.num_video_query_tokens,
                                                   depth=config.video_qformer_num_hidden_layers,
                                                   context_dim=config.qformer_hidden_size, cross_attention_frequency=1,
                                                   **shape)
        finally:
            torch.set_default_dtype(previous)
        self.language_projection = nn.Linear(config.qformer_hidden_size, config.text_config.hidden_size)
        if config.video_bridge == "video_qformer":
            self.frame_position_embedding = nn.Embedding(config.max_num_frames, config.qformer_hidden_size)
            self.video_projection = nn.Linear(config.qformer_hidden_size, config.text_config.hidden_size)
        self.post_init()

    def bridge_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in self._bridge_modules if hasattr(self, name)}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FusionQFormer):
            init.normal_(module.query_tokens, std=0.02)

    def query_outputs(self, features: torch.Tensor, qformer_input_ids: torch.LongTensor | None = None,
                      qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The Q-Former's query outputs `(N, Q, D_q)` (fp32) for image features `(N, V, D_v)`;
        `qformer_input_ids` / `qformer_attention_mask` `(N, T)`: each image's instruction (instruction-aware only)."""
        if self.config.qformer_text_input and qformer_input_ids is None:
            raise ValueError("This model's Q-Former reads the instruction: pass `qformer_input_ids` (the processor "
                             "makes them) with the images.")
        if not self.config.qformer_text_input and qformer_input_ids is not None:
            raise ValueError("`qformer_input_ids` were given, but this model's Q-Former reads no text "
                             "(`qformer_text_input=False`).")
        features = self.vision_layernorm(features.to(self.vision_layernorm.weight.dtype))  # (N, V, D_v)
        return self.qformer(features.to(self.qformer.query_tokens.dtype), qformer_input_ids,
                            qformer_attention_mask)[:, : self.config.num_query_tokens]  # (N, Q, D_q)

    def encode_images(self, features: torch.Tensor, qformer_input_ids: torch.LongTensor | None = None,
                      qformer_attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`qformer_input_ids` / `qformer_attention_mask` `(N, T)`: each image's instruction (instruction-aware only)."""
        queries = self.query_outputs(features, qformer_input_ids, qformer_attention_mask)  # (N, Q, D_q)
        return self.language_projection(queries.to(self.language_projection.weight.dtype))  # (N, Q, D)

    def encode_videos(self, features: torch.Tensor, qformer_input_ids: torch.LongTensor | None = None,
                      qformer_attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """
        Args:
            features (`torch.Tensor` of shape `(num_videos, num_frames, num_patches, vision_hidden_size)`).
            qformer_input_ids, qformer_attention_mask (`torch.Tensor` of shape `(num_videos, instruction_length)`,
                *optional*): each clip's instruction, read with every one of its frames.

        Returns:
            `torch.Tensor` of shape `(num_videos, config.num_video_tokens(num_frames), hidden_size)`.
        """
        C, F = features.shape[:2]
        if qformer_input_ids is not None:  # (C, T) -> (C*F, T): every frame reads its clip's instruction
            qformer_input_ids = qformer_input_ids.repeat_interleave(F, dim=0)
            if qformer_attention_mask is not None:
                qformer_attention_mask = qformer_attention_mask.repeat_interleave(F, dim=0)
        queries = self.query_outputs(features.flatten(0, 1), qformer_input_ids, qformer_attention_mask)  # (C*F, Q, D_q)
        queries = queries.unflatten(0, (C, F))  # (C, F, Q, D_q)
        if self.config.video_bridge == "video_qformer":
            return self.video_qformer_tokens(queries)
        tokens = self.language_projection(queries.to(self.language_projection.weight.dtype))  # (C, F, Q, D)
        return tokens.flatten(1, 2)  # (C, F*Q, D): frame after frame, as InstructBLIP-Video

    def video_qformer_tokens(self, queries: torch.Tensor) -> torch.Tensor:
        """Video-LLaMA's video Q-Former: the frames' query outputs `(C, F, Q, D_q)`, each frame's position added,
        read together by `num_video_query_tokens` queries -> `(C, N_vq, D)`."""
        C, F, Q, D_q = queries.shape
        if F > self.config.max_num_frames:
            raise ValueError(f"A clip of {F} frames is longer than the frame-position embedding's "
                             f"`max_num_frames` ({self.config.max_num_frames}).")
        positions = self.frame_position_embedding.weight[:F, None, :]  # (F, 1, D_q)
        frames = (queries + positions.to(queries.dtype)).flatten(1, 2)  # (C, F*Q, D_q)
        video = self.video_qformer(frames.to(self.video_qformer.query_tokens.dtype))  # (C, N_vq, D_q)
        return self.video_projection(video.to(self.video_projection.weight.dtype))  # (C, N_vq, D)

    def blank_image_inputs(self) -> dict:
        inputs = super().blank_image_inputs()
        if self.config.qformer_text_input:  # an empty instruction: its one pad token
            device = inputs["pixel_values"].device
            inputs["qformer_input_ids"] = torch.full((1, 1), self.config.qformer_pad_token_id, device=device)
            inputs["qformer_attention_mask"] = torch.ones(1, 1, dtype=torch.long, device=device)
        return inputs

    def instruction_per_item(self, mask: torch.BoolTensor, num_items: int, tokens_per_item: int, kind: str,
                             qformer_input_ids: torch.LongTensor, qformer_attention_mask=None) -> dict:
        """The instruction, given per sample `(B, T)`, repeated for each of the batch's `num_items` images or clips
        (`kind`), `(num_items, T)`: each reads its own sample's. `mask` `(B, T)`: their placeholder positions."""
        counts = mask.sum(-1)  # (B,)
        if int(counts.sum()) != num_items * tokens_per_item or bool((counts % tokens_per_item).any()):
            raise ValueError(f"{kind.capitalize()} features and {kind} tokens do not match: the samples hold "
                             f"{counts.tolist()} {kind} tokens, the {num_items} {kind}s give {tokens_per_item} each.")
        per_sample = (counts // tokens_per_item).to(qformer_input_ids.device)  # (B,) images or clips of each sample
        if qformer_attention_mask is not None:
            qformer_attention_mask = qformer_attention_mask.repeat_interleave(
                per_sample.to(qformer_attention_mask.device), dim=0)
        return {"qformer_input_ids": qformer_input_ids.repeat_interleave(per_sample, dim=0),
                "qformer_attention_mask": qformer_attention_mask}

    def embed_inputs(self, input_ids, inputs_embeds, pixel_values, qformer_input_ids=None, qformer_attention_mask=None):
        """The instruction is given per sample `(B, T)`; each image reads its own sample's."""
        image_kwargs = {}
        if pixel_values is not None and qformer_input_ids is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds)  # (B, T)
            image_kwargs = self.instruction_per_item(mask, len(pixel_values), self.config.num_query_tokens, "image",
                                                     qformer_input_ids, qformer_attention_mask)
        return super().embed_inputs(input_ids, inputs_embeds, pixel_values, **image_kwargs)

    def embed_videos(self, input_ids, inputs_embeds, pixel_values_videos, qformer_input_ids=None,
                     qformer_attention_mask=None):
        """As `embed_inputs`: each clip reads its own sample's instruction (with every frame, see `encode_videos`)."""
        video_kwargs = {}
        if pixel_values_videos is not None and qformer_input_ids is not None and self.config.video_token_id is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, token_id=self.config.video_token_id)  # (B, T)
            video_kwargs = self.instruction_per_item(mask, len(pixel_values_videos),
                                                     self.config.num_video_tokens(pixel_values_videos.shape[1]),
                                                     "video", qformer_input_ids, qformer_attention_mask)
        return super().embed_videos(input_ids, inputs_embeds, pixel_values_videos, **video_kwargs)


class FusionBlip2ForConditionalGeneration(FusionForConditionalGeneration, GenerationMixin):
    """[`FusionBlip2Model`] with the LM's head: what `AutoModelForImageTextToText` builds for `fusion_blip2`."""

    config_class = FusionBlip2Config
    model_class = FusionBlip2Model

    @classmethod
    def from_qformer_pretrained(cls, qformer_name_or_path: str, text_model_name_or_path: str, *,
                                text_kwargs: dict | None = None, **config_kwargs):
        """
        BLIP-2's generative stage from its stage 1: the stage-1 checkpoint's vision tower, layer norm and Q-Former (its
        queries, self- and cross-attention and query FFN; with `qformer_text_input=True`, InstructBLIP's, also the text
        embeddings and text FFN it reads the instruction with), a pretrained causal LM, and a new
        `language_projection`. The stage-1 heads (ITC, ITM, ITG) are left behind.
        """
        from transformers import AutoModelForCausalLM

        from .modeling_qformer import FusionBlip2ForImageTextRetrieval

        stage1 = FusionBlip2ForImageTextRetrieval.from_pretrained(qformer_name_or_path)
        language_model = AutoModelForCausalLM.from_pretrained(text_model_name_or_path, **(text_kwargs or {}))
        config = cls._stage2_config(qformer_name_or_path, text_model_name_or_path, stage1.config,
                                    language_model.config, config_kwargs)
        model = cls(config, vision_tower=stage1.vision_tower, language_model=language_model)
        carried = {k: v for k, v in stage1.state_dict().items() if k.startswith(("vision_layernorm.", "qformer."))}
        bridge = {k: v for k, v in model.model.state_dict().items() if k.startswith(("vision_layernorm.", "qformer."))}
        if not config.qformer_text_input:  # the generation path reads no text
            carried = {k: v for k, v in carried.items() if k in bridge}
        if set(carried) != set(bridge):
            raise ValueError(f"The stage-1 Q-Former of {qformer_name_or_path} does not fit: missing "
                             f"{sorted(set(bridge) - set(carried))[:3]}, extra {sorted(set(carried) - set(bridge))[:3]}.")
        model.model.load_state_dict(carried, strict=False)
        return model

    @classmethod
    def config_from_qformer_pretrained(cls, qformer_name_or_path: str, text_model_name_or_path: str, **config_kwargs):
        """The config `from_qformer_pretrained` composes, from the two checkpoints' configs alone (no weight read)."""
        from transformers import AutoConfig

        return cls._stage2_config(qformer_name_or_path, text_model_name_or_path,
                                  AutoConfig.from_pretrained(qformer_name_or_path),
                                  AutoConfig.from_pretrained(text_model_name_or_path), config_kwargs)

    @classmethod
    def _stage2_config(cls, qformer_name_or_path, text_model_name_or_path, stage1_config, text_config, config_kwargs):
        from .modeling_base import _default_placeholder_ids

        config_kwargs = dict(config_kwargs)
        if "image_token_id" not in config_kwargs:
            config_kwargs["image_token_id"] = _default_placeholder_ids(text_model_name_or_path, text_config)[0]
        config_kwargs.setdefault("origin", f"BLIP-2's generative stage from the stage-1 Q-Former "
                                           f"`{qformer_name_or_path}` and the language model `{text_model_name_or_path}`;"
                                           " the language projection was initialised.")
        return cls.config_class(**{**stage1_config.generation_fields(), "text_config": text_config, **config_kwargs})
