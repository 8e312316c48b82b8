"""Convert a BLIP-2 checkpoint into a vlm-fusion model with its processor: a generation checkpoint (decoder-only LM)
into `fusion_blip2`, a stage-1 (image-text retrieval) checkpoint into `fusion_blip2_qformer`.

    # transformers' Blip2ForConditionalGeneration layout (Salesforce/blip2-opt-2.7b and friends)
    vlm-fusion convert blip2 --source hf --input DIR --output DIR
    # transformers' InstructBlipForConditionalGeneration (Salesforce/instructblip-vicuna-7b and friends)
    vlm-fusion convert blip2 --source instructblip --input DIR --output DIR
    # the original LAVIS layout; the vision tower (a Blip2VisionModel directory, with the image processor) and the
    # language model (with its tokenizer) supply what the .pth does not hold
    vlm-fusion convert blip2 --source lavis --input FILE.pth --vision-tower DIR \\
        --language-model DIR --output DIR

    # BLIP-2's stage 1 -> FusionBlip2ForImageTextRetrieval (ITC, ITM and ITG heads, no LM):
    # transformers' Blip2ForImageTextRetrieval (Salesforce/blip2-itm-vit-g). It has no ITG head and no temperature:
    # `text_head`'s dense and norm are newly initialised (its decoder is tied to the word embeddings anyway) and the
    # temperature is the config's default, 0.07 -- ITC and ITM are converted, ITG needs training. Blip2Processor's
    # `<image>` placeholder, past the Q-Former's vocabulary, is removed from the tokenizer.
    vlm-fusion convert blip2 --source hf-retrieval --input DIR --output DIR
    # LAVIS's stage-1 file (blip2_pretrained.pth, Blip2Qformer): the Q-Former with its text branch, ITC projections,
    # ITM head, ITG head (`Qformer.cls`), temperature, `ln_vision`, and the EVA tower if saved (else it comes from
    # --vision-tower, which also gives the image processor); the tokenizer is bert-base-uncased's, [DEC] added
    vlm-fusion convert blip2 --source lavis-stage1 --input FILE.pth --vision-tower DIR \\
        --qformer-tokenizer DIR --output DIR

Every source key must be consumed by the tables below (or dropped by a rule that says why) and every model weight
filled, or nothing is written. Before finishing, the script compares the written model with the source implementation:
logits for generation; for stage 1 from transformers, ITC cosines and ITM logits against Blip2ForImageTextRetrieval;
for stage 1 from LAVIS (which does not run here), the tower against its directory, ITC and ITM against transformers'
Blip2ForImageTextRetrieval holding the file's tensors, the ITG head against transformers' BERT head, the temperature --
and it prints what it could not check (the ITG pass and the losses; the tests compare those with LAVIS itself).
"""

import argparse
import sys

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from vlm_fusion import (
    FusionBlip2Config,
    FusionBlip2ForConditionalGeneration,
    FusionBlip2Processor,
    FusionInstructBlipProcessor,
)
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion import convert_blip2_stage1 as stage1
from vlm_fusion.conversion.blip2_common import (
    EVA_RULES,
    LAVIS_LN_VISION_EPS,
    lavis_qformer_config,
    merge_eva_qkv_bias,
    qformer_fields,
    share_vision_norm,
    with_backbone,
)
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image
from vlm_fusion.modeling_qformer import qformer_rules
from vlm_fusion.vision import load_vision_tower

PROMPT = "Question: what is shown in this image? Answer:"


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
        *EVA_RULES,
        (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
        (r"^Qformer\.bert\.embeddings\.(?:word_embeddings|position_embeddings|position_ids)", None),  # text branch
        (r"^Qformer\.cls\.", None),  # text branch
        *qformer_rules(r"Qformer\.bert\.encoder\.layer\."),
        (r"^opt_proj\.", "language_projection."),
        (r"^opt_model\.model\.", f"language_model.{lm_prefix}."),
        (r"^opt_model\.lm_head\.", "language_model.lm_head."),
    ]

def fusion_config(vision_config, text_config, qformer, num_query_tokens, image_token_id, vision_layer_norm_eps,
                  text_input: bool = False):
    return FusionBlip2Config(
        vision_config=vision_config,
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        vision_layer_norm_eps=vision_layer_norm_eps,
        image_token_id=image_token_id,
        **qformer_fields(qformer, text=text_input),
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
    write_and_compare_logits(args, config, state_dict, processor, reference)


# ---- LAVIS -----------------------------------------------------------------------------------------------------
def convert_lavis(args):
    if not (args.vision_tower and args.language_model):
        raise ConversionError("--source lavis needs --vision-tower DIR and --language-model DIR.")
    source = read_state_dict(args.input)
    if any(k.startswith(("t5_proj", "t5_model")) for k in source):
        raise ConversionError("LAVIS blip2_t5 checkpoints are not supported: the LM must be causal.")
    if "query_tokens" not in source:
        raise ConversionError(f"{args.input} is not a LAVIS BLIP-2 checkpoint: it has no `query_tokens` (its keys: "
                              f"{conversion.preview(sorted(source))}).")
    vision_config = AutoConfig.from_pretrained(args.vision_tower)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    text_config = AutoConfig.from_pretrained(args.language_model)
    processor = FusionBlip2Processor(image_processor=AutoImageProcessor.from_pretrained(args.vision_tower),
                                     tokenizer=AutoTokenizer.from_pretrained(args.language_model),
                                     image_seq_length=source["query_tokens"].shape[1])
    qformer = lavis_qformer_config(source, args)
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
    write_and_compare_logits(args, config, state_dict, processor, reference=None)

# ---- shared ----------------------------------------------------------------------------------------------------
def write_and_compare_logits(args, config, state_dict, processor, reference):
    """Write the generation model, then compare its logits on the sample prompt with `reference(inputs)`'s (no
    reference: LAVIS, which does not run here; the LM half is compared with its own directory)."""
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


# --source -> its conversion; BLIP-2's stage 1 is converted by `convert_blip2_stage1`.
SOURCES = {"hf": convert_hf, "instructblip": convert_hf, "lavis": convert_lavis,
           "hf-retrieval": stage1.convert_hf_retrieval, "lavis-stage1": stage1.convert_lavis_stage1}


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=list(SOURCES), required=True)
    parser.add_argument("--input", required=True,
                        help="checkpoint directory (hf, instructblip, hf-retrieval) or .pth file (lavis, lavis-stage1)")
    parser.add_argument("--vision-tower", help="vision tower directory with the image processor (lavis, lavis-stage1; "
                        "a Blip2VisionModel when the .pth holds the EVA tower)")
    parser.add_argument("--language-model", help="causal LM directory with its tokenizer (lavis)")
    parser.add_argument("--qformer-tokenizer", help="the Q-Former's BERT tokenizer directory, bert-base-uncased's in "
                        "LAVIS; [DEC] is added (lavis-stage1)")
    parser.add_argument("--qformer-heads", type=int,
                        help="Q-Former attention heads (lavis, lavis-stage1: the .pth does not record them). Default: "
                        "a config.json beside the file, else --qformer-tokenizer's config.json, else 12 (BLIP-2's) "
                        "for a 768-wide Q-Former; any other width needs the flag")
    conversion.add_common_arguments(parser)
    return conversion.check_common_arguments(parser, parser.parse_args(argv))


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    return conversion.run(SOURCES[args.source], args)


if __name__ == "__main__":
    sys.exit(main())
