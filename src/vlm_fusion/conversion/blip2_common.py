"""What BLIP-2's two converters share (`convert_blip2` for generation, `convert_blip2_stage1` for stage 1): LAVIS's EVA
tower's key table and transforms, the Q-Former's config fields, and its shape read off a LAVIS file, which records no
config (its attention heads least of all)."""

import torch

from vlm_fusion.conversion.common import ConversionError


# LAVIS's EVA ViT-g (`visual_encoder.*`) -> transformers' Blip2VisionModel names (q/v biases merged by
# `merge_eva_qkv_bias`).
EVA_RULES = [
    (r"^visual_encoder\.cls_token$", "vision_tower.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_tower.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_tower.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_tower.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_tower.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_tower.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$", r"vision_tower.encoder.layers.\1.self_attn.\2_bias"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_tower.encoder.layers.\1.mlp."),
]

# LAVIS's `ln_vision` is `nn.LayerNorm(num_features)`: torch's default eps, whatever the tower's own norms use.
LAVIS_LN_VISION_EPS = 1e-5


def with_backbone(state_dict: dict, part: str, backbone: dict, args) -> dict:
    """`state_dict` completed with the `part` (`vision_tower` / `language_model`) weights of its directory."""
    held = sum(k.startswith(f"{part}.") for k in state_dict)
    if held < len(backbone):
        source = args.vision_tower if part == "vision_tower" else args.language_model
        print(f"[{part}] the checkpoint holds {held} of its {len(backbone)} tensors; the rest come from {source}")
    return {**{f"{part}.{k}": v for k, v in backbone.items()}, **state_dict}


def merge_eva_qkv_bias(state_dict: dict) -> dict:
    """EVA keeps q and v biases (k has none); transformers' fused qkv bias is `cat(q_bias, 0, v_bias)`."""
    for key in [k for k in state_dict if k.endswith(".self_attn.q_bias")]:
        prefix = key[: -len("q_bias")]
        q, v = state_dict.pop(key), state_dict.pop(prefix + "v_bias")
        state_dict[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    return state_dict


def share_vision_norm(state_dict: dict) -> dict:
    """EVA has no final norm of its own (LAVIS's `ln_vision` is ours); the tower's `post_layernorm`, which is not on
    our path, gets the same weights, as transformers' Blip2 conversion gives it."""
    for name in ("weight", "bias"):
        state_dict[f"vision_tower.post_layernorm.{name}"] = state_dict[f"vision_layernorm.{name}"].clone()
    return state_dict


def qformer_fields(qformer, *, text: bool) -> dict:
    """Our config's Q-Former fields from a transformers `Blip2QFormerConfig` (with `text`: its text side's too)."""
    if qformer.hidden_act != "gelu":
        raise ConversionError(f"Q-Former activation {qformer.hidden_act!r} is not supported (only gelu).")
    fields = dict(
        qformer_hidden_size=qformer.hidden_size,
        qformer_num_hidden_layers=qformer.num_hidden_layers,
        qformer_num_attention_heads=qformer.num_attention_heads,
        qformer_intermediate_size=qformer.intermediate_size,
        cross_attention_frequency=qformer.cross_attention_frequency,
        qformer_layer_norm_eps=qformer.layer_norm_eps,
        qformer_dropout=qformer.hidden_dropout_prob,
    )
    if text:
        fields.update(qformer_text_input=True, qformer_vocab_size=qformer.vocab_size,
                      qformer_max_position_embeddings=qformer.max_position_embeddings,
                      qformer_pad_token_id=qformer.pad_token_id)
    return fields

BLIP2_QFORMER_HEADS, BLIP2_QFORMER_WIDTH = 12, 768  # bert-base-uncased's, which LAVIS builds every Q-Former from


def _recorded_heads(path: str) -> int | None:
    """`num_attention_heads` of a config.json (a BERT config, or a Q-Former config at its top or under
    `qformer_config`) at `path`, if there is one."""
    import json
    import os

    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    heads = config.get("num_attention_heads", (config.get("qformer_config") or {}).get("num_attention_heads"))
    return heads if isinstance(heads, int) else None


def qformer_heads(args, hidden: int) -> tuple[int, str]:
    """The Q-Former's attention heads and where the number came from. A LAVIS file does not record them (its
    Q-Former is `BertConfig.from_pretrained("bert-base-uncased")`'s, 12 heads, widened by nothing), and the
    converter's verification cannot see them (its reference is built with the same count), so: `--qformer-heads`;
    else a config.json beside the file; else the config.json of `--qformer-tokenizer` (LAVIS reads the BERT config
    from where it reads the tokenizer); else BLIP-2's 12, only for a 768-wide Q-Former (BERT-base's width): any
    other width was not built by LAVIS's code as released, and guessing would convert silently wrong."""
    import os

    beside = os.path.join(os.path.dirname(os.path.abspath(args.input)), "config.json")
    recorded = _recorded_heads(beside)
    tokenizer_config = os.path.join(args.qformer_tokenizer, "config.json") if getattr(args, "qformer_tokenizer", None) \
        else None
    from_tokenizer = _recorded_heads(tokenizer_config) if tokenizer_config else None
    if args.qformer_heads is not None:
        if recorded is not None and recorded != args.qformer_heads:
            raise ConversionError(f"--qformer-heads {args.qformer_heads}, but {beside} records {recorded} attention "
                                  "heads: one of them is wrong.")
        heads, where = args.qformer_heads, "--qformer-heads"
        if from_tokenizer is not None and from_tokenizer != heads:
            print(f"[qformer] note: {tokenizer_config} records {from_tokenizer} heads; --qformer-heads {heads} wins")
    elif recorded is not None:
        heads, where = recorded, beside
    elif from_tokenizer is not None:
        heads, where = from_tokenizer, f"{tokenizer_config} (the --qformer-tokenizer's BERT config, as LAVIS reads it)"
    elif hidden == BLIP2_QFORMER_WIDTH:
        heads, where = BLIP2_QFORMER_HEADS, ("BLIP-2's default (bert-base-uncased's): the file does not record them; "
                                             "give --qformer-heads if yours differs")
    else:
        raise ConversionError(f"The file does not record the Q-Former's attention heads, and its width {hidden} is "
                              f"not BLIP-2's {BLIP2_QFORMER_WIDTH} (where they are {BLIP2_QFORMER_HEADS}): give "
                              "--qformer-heads N (or a config.json with num_attention_heads beside the file).")
    if heads <= 0 or hidden % heads:
        raise ConversionError(f"The Q-Former is {hidden} wide: {heads} attention heads (from {where}) do not divide "
                              "it.")
    print(f"[qformer] {heads} attention heads, from {where}")
    return heads, where


def lavis_qformer_config(source, args, **text_fields):
    """The Q-Former's shape, read off the LAVIS weights (the .pth carries no config); `text_fields` (vocabulary,
    positions, padding id) for a Q-Former that reads text."""
    from transformers import Blip2QFormerConfig

    prefix = "Qformer.bert.encoder.layer."
    layers = sorted({int(k[len(prefix):].split(".")[0]) for k in source if k.startswith(prefix)})
    cross = sorted({int(k[len(prefix):].split(".")[0]) for k in source if k.startswith(prefix) and ".crossattention." in k})
    hidden = source["query_tokens"].shape[-1]
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), frequency)):
        raise ConversionError(f"Cross-attention in layers {cross} is not every {frequency}th layer from layer 0.")
    return Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=qformer_heads(args, hidden)[0],
        intermediate_size=source[f"{prefix}0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=frequency, layer_norm_eps=1e-12, **text_fields,
    )
