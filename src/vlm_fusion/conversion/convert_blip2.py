"""Convert a BLIP-2 checkpoint (decoder-only LM) into a vlm-fusion `fusion_blip2` model with its processor.

    # transformers' Blip2ForConditionalGeneration layout (Salesforce/blip2-opt-2.7b and friends)
    vlm-fusion convert blip2 --source hf --input DIR --output DIR
    # transformers' InstructBlipForConditionalGeneration (Salesforce/instructblip-vicuna-7b and friends)
    vlm-fusion convert blip2 --source instructblip --input DIR --output DIR
    # the original LAVIS layout; the vision tower (a Blip2VisionModel directory, with the image processor) and the
    # language model (with its tokenizer) supply what the .pth does not hold
    vlm-fusion convert blip2 --source lavis --input FILE.pth --vision-tower DIR \\
        --language-model DIR --output DIR

Every source key must be consumed by the tables below and every model weight filled, or nothing is written.
Before finishing, the script compares the written model's logits with the source implementation's.
"""

import argparse
import sys

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from vlm_fusion import (
    FusionBlip2Config,
    FusionBlip2ForConditionalGeneration,
    FusionBlip2Processor,
    FusionInstructBlipProcessor,
)
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image
from vlm_fusion.vision import load_vision_tower

PROMPT = "Question: what is shown in this image? Answer:"

# One Q-Former layer, transformers' names -> ours. LAVIS differs only by `attention.self` for `attention.attention`.
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


def qformer_rules(layer_prefix: str) -> list[tuple[str, str | None]]:
    rules = [(rf"^{layer_prefix}(\d+)\.{src}", rf"qformer.layers.\1.{dst}") for src, dst in QFORMER_LAYER_RULES]
    # The Q-Former's text branch (unused by BLIP-2 generation) is dropped on purpose.
    return rules + [(rf"^{layer_prefix}\d+\.(?:intermediate|output)\.", None)]


def hf_rules(lm_prefix: str) -> list[tuple[str, str | None]]:
    return [
        (r"^query_tokens$", "qformer.query_tokens"),
        (r"^vision_model\.", "vision_tower."),
        (r"^qformer\.layernorm\.", "qformer.layernorm."),
        *qformer_rules(r"qformer\.encoder\.layer\."),
        (r"^language_projection\.", "language_projection."),
        (r"^language_model\.model\.", f"language_model.{lm_prefix}."),
        (r"^language_model\.lm_head\.", "language_model.lm_head."),
    ]


def instructblip_rules(lm_prefix: str) -> list[tuple[str, str | None]]:
    """InstructBLIP: BLIP-2's keys, plus the Q-Former's text embeddings and each layer's text feed-forward."""
    layer = r"^qformer\.encoder\.layer\.(\d+)\."
    return [
        (r"^qformer\.embeddings\.word_embeddings\.", "qformer.word_embeddings."),
        (r"^qformer\.embeddings\.position_embeddings\.", "qformer.position_embeddings."),
        (r"^qformer\.embeddings\.layernorm\.", "qformer.layernorm."),
        (layer + r"intermediate\.dense\.", r"qformer.layers.\1.text_ff.0."),
        (layer + r"output\.dense\.", r"qformer.layers.\1.text_ff.2."),
        (layer + r"output\.LayerNorm\.", r"qformer.layers.\1.text_ff_norm."),
        *hf_rules(lm_prefix),
    ]


def lavis_rules(lm_prefix: str) -> list[tuple[str, str | None]]:
    """LAVIS blip2_opt: EVA ViT `visual_encoder.*`, `ln_vision`, `Qformer.bert.*`, `opt_proj`, `opt_model.*`."""
    return [
        (r"^query_tokens$", "qformer.query_tokens"),
        (r"^ln_vision\.", "vision_layernorm."),
        (r"^visual_encoder\.cls_token$", "vision_tower.embeddings.class_embedding"),
        (r"^visual_encoder\.pos_embed$", "vision_tower.embeddings.position_embedding"),
        (r"^visual_encoder\.patch_embed\.proj\.", "vision_tower.embeddings.patch_embedding."),
        (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_tower.encoder.layers.\1.layer_norm1."),
        (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_tower.encoder.layers.\1.layer_norm2."),
        (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_tower.encoder.layers.\1.self_attn.qkv.weight"),
        (r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$", r"vision_tower.encoder.layers.\1.self_attn.\2_bias"),
        (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.layers.\1.self_attn.projection."),
        (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_tower.encoder.layers.\1.mlp."),
        (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
        (r"^Qformer\.bert\.embeddings\.(?:word_embeddings|position_embeddings|position_ids)", None),  # text branch
        (r"^Qformer\.cls\.", None),  # text branch
        *qformer_rules(r"Qformer\.bert\.encoder\.layer\."),
        (r"^opt_proj\.", "language_projection."),
        (r"^opt_model\.model\.", f"language_model.{lm_prefix}."),
        (r"^opt_model\.lm_head\.", "language_model.lm_head."),
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


def fusion_config(vision_config, text_config, qformer, num_query_tokens, image_token_id, vision_layer_norm_eps,
                  text_input: bool = False):
    if qformer.hidden_act != "gelu":
        raise ConversionError(f"Q-Former activation {qformer.hidden_act!r} is not supported (only gelu).")
    return FusionBlip2Config(
        vision_config=vision_config,
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        qformer_hidden_size=qformer.hidden_size,
        qformer_num_hidden_layers=qformer.num_hidden_layers,
        qformer_num_attention_heads=qformer.num_attention_heads,
        qformer_intermediate_size=qformer.intermediate_size,
        cross_attention_frequency=qformer.cross_attention_frequency,
        qformer_layer_norm_eps=qformer.layer_norm_eps,
        qformer_dropout=qformer.hidden_dropout_prob,
        vision_layer_norm_eps=vision_layer_norm_eps,
        image_token_id=image_token_id,
        **(dict(qformer_text_input=True, qformer_vocab_size=qformer.vocab_size,
                qformer_max_position_embeddings=qformer.max_position_embeddings,
                qformer_pad_token_id=qformer.pad_token_id) if text_input else {}),
    )


# ---- transformers Blip2 -------------------------------------------------------------------------------------------
def convert_hf(args):
    """transformers' Blip2ForConditionalGeneration, or (`--source instructblip`) InstructBlipForConditionalGeneration."""
    instruct = args.source == "instructblip"
    source = AutoConfig.from_pretrained(args.input)
    expected = "instructblip" if instruct else "blip-2"
    if source.model_type != expected:
        raise ConversionError(f"--source {args.source} expects a `{expected}` config, {args.input} holds "
                              f"{source.model_type!r}.")
    if not getattr(source, "use_decoder_only_language_model", True):
        raise ConversionError("Encoder-decoder (T5) checkpoints are not supported: the LM must be causal.")
    source_processor = AutoProcessor.from_pretrained(args.input)
    if instruct:
        processor = FusionInstructBlipProcessor(image_processor=source_processor.image_processor,
                                                tokenizer=source_processor.tokenizer,
                                                qformer_tokenizer=source_processor.qformer_tokenizer,
                                                image_seq_length=source.num_query_tokens)
    else:
        processor = FusionBlip2Processor(image_processor=source_processor.image_processor,
                                         tokenizer=source_processor.tokenizer, image_seq_length=source.num_query_tokens)
    image_token_id = getattr(source, "image_token_id", None)
    if image_token_id is not None and image_token_id != processor.image_token_id:
        raise ConversionError(f"The config's image token {image_token_id} is not the tokenizer's <image> "
                              f"({processor.image_token_id}).")
    config = fusion_config(source.vision_config, source.text_config, source.qformer_config,
                           source.num_query_tokens, processor.image_token_id,
                           vision_layer_norm_eps=source.vision_config.layer_norm_eps,  # its post_layernorm
                           text_input=instruct)
    rules = (instructblip_rules if instruct else hf_rules)(conversion.lm_base_prefix(config.text_config))
    state_dict = rename_keys(read_state_dict(args.input), rules)
    for name in ("weight", "bias"):  # transformers norms inside the tower; our bridge norms the selected layer
        state_dict[f"vision_layernorm.{name}"] = state_dict[f"vision_tower.post_layernorm.{name}"].clone()

    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    reference_cls = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    reference = conversion.transformers_reference(reference_cls, args.input, args.dtype, source_processor, PROMPT)
    write_and_verify(args, config, state_dict, processor, reference)


# ---- LAVIS -----------------------------------------------------------------------------------------------------
def convert_lavis(args):
    if not (args.vision_tower and args.language_model):
        raise ConversionError("--source lavis needs --vision-tower DIR and --language-model DIR.")
    source = read_state_dict(args.input)
    if any(k.startswith(("t5_proj", "t5_model")) for k in source):
        raise ConversionError("LAVIS blip2_t5 checkpoints are not supported: the LM must be causal.")
    if "query_tokens" not in source:
        raise ConversionError(f"{args.input} is not a LAVIS BLIP-2 checkpoint: it has no `query_tokens` (its keys: "
                              f"{conversion._preview(sorted(source))}).")
    vision_config = AutoConfig.from_pretrained(args.vision_tower)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    text_config = AutoConfig.from_pretrained(args.language_model)
    processor = FusionBlip2Processor(image_processor=AutoImageProcessor.from_pretrained(args.vision_tower),
                                     tokenizer=AutoTokenizer.from_pretrained(args.language_model),
                                     image_seq_length=source["query_tokens"].shape[1])
    qformer = _lavis_qformer_config(source, args)
    config = fusion_config(vision_config, text_config, qformer, source["query_tokens"].shape[1],
                           processor.image_token_id, vision_layer_norm_eps=LAVIS_LN_VISION_EPS)
    state_dict = merge_eva_qkv_bias(rename_keys(source, lavis_rules(conversion.lm_base_prefix(text_config))))
    # LAVIS's runner saves trainable parameters only: the frozen ViT and LM are missing, except for what tying kept
    # (the LM head, tied to the frozen embeddings). Each backbone comes from its directory; the file's own tensors
    # of it, if any, go on top.
    state_dict = share_vision_norm(state_dict)
    tower = load_vision_tower(args.vision_tower)
    lm = AutoModelForCausalLM.from_pretrained(args.language_model)
    for part, module in (("vision_tower", tower), ("language_model", lm)):
        state_dict = with_backbone(state_dict, part, module.state_dict(), args)
    write_and_verify(args, config, state_dict, processor, reference=None)


def _lavis_qformer_config(source, args):
    """The Q-Former's shape, read off the LAVIS weights (the .pth carries no config)."""
    from transformers import Blip2QFormerConfig

    prefix = "Qformer.bert.encoder.layer."
    layers = sorted({int(k[len(prefix):].split(".")[0]) for k in source if k.startswith(prefix)})
    cross = sorted({int(k[len(prefix):].split(".")[0]) for k in source if k.startswith(prefix) and ".crossattention." in k})
    hidden = source["query_tokens"].shape[-1]
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), frequency)):
        raise ConversionError(f"Cross-attention in layers {cross} is not every {frequency}th layer from layer 0.")
    return Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=args.qformer_heads,
        intermediate_size=source[f"{prefix}0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=frequency, layer_norm_eps=1e-12,
    )


# ---- shared ----------------------------------------------------------------------------------------------------
def write_and_verify(args, config, state_dict, processor, reference):
    def verify(path):
        converted_processor = FusionBlip2Processor.from_pretrained(path)  # InstructBLIP's loads as its own class
        model = FusionBlip2ForConditionalGeneration.from_pretrained(path, dtype=args.dtype).eval()
        inputs = converted_processor(images=sample_image(), text=PROMPT, return_tensors="pt")
        if reference is None:  # LAVIS itself does not install here: check the pieces we did not write
            lm_only = AutoModelForCausalLM.from_pretrained(args.language_model, dtype=args.dtype).eval()
            text_ids = inputs["input_ids"][:, config.num_query_tokens:]
            print("[verify] LAVIS does not run here: checking the language-model half against its own directory")
            compare_logits("language model alone vs converted (text only)", model(input_ids=text_ids).logits,
                           lm_only(input_ids=text_ids).logits, args.atol)
            return
        compare_logits(f"{args.source} vs converted", model(**inputs).logits, reference(inputs), args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionBlip2ForConditionalGeneration,
                                config=config, state_dict=state_dict, processor=processor, verify=verify)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["hf", "instructblip", "lavis"], required=True)
    parser.add_argument("--input", required=True, help="checkpoint directory (hf) or .pth file (lavis)")
    parser.add_argument("--vision-tower", help="Blip2VisionModel directory with the image processor (lavis)")
    parser.add_argument("--language-model", help="causal LM directory with its tokenizer (lavis)")
    parser.add_argument("--qformer-heads", type=int, default=12, help="Q-Former attention heads (lavis; 12 in BLIP-2)")
    conversion.add_common_arguments(parser)
    return conversion.check_common_arguments(parser, parser.parse_args(argv))


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    return conversion.run((convert_lavis if args.source == "lavis" else convert_hf), args)


if __name__ == "__main__":
    sys.exit(main())
