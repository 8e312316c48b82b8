"""Convert a LLaVA checkpoint into a vlm-fusion `fusion_llava` model (weights, config and processor).

    # transformers' LlavaForConditionalGeneration layout (llava-hf/*), with its processor
    vlm-fusion convert llava --source llava-hf --input DIR --output DIR
    # transformers' LlavaNextForConditionalGeneration (llava-hf/llava-v1.6-*): dynamic-resolution tiling
    vlm-fusion convert llava --source llava-next --input DIR --output DIR
    # the original LLaVA layout (liuhaotian/llava-v1.5-*): LM + `model.mm_projector.*`, vision tower separate
    vlm-fusion convert llava --source original --input DIR --vision-tower DIR --output DIR

Every source key must be consumed by the tables below and every model weight filled, or nothing is written.
Before finishing, the script loads the written model and the source implementation and compares their logits.
"""

import argparse
import json
import os
import sys

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from vlm_fusion import FusionLlavaConfig, FusionLlavaForConditionalGeneration, FusionLlavaProcessor
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image
from vlm_fusion.vision import load_vision_tower

PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"


def llava_hf_rules(lm_prefix: str) -> list[tuple[str, str]]:
    """transformers' Llava keys, both the v5 layout (`model.*`, `lm_head`) and the v4 one (`language_model.model.*`)."""
    return [
        (r"^(?:model\.)?vision_tower\.", "vision_tower."),
        (r"^(?:model\.)?multi_modal_projector\.", "multi_modal_projector."),
        (r"^model\.language_model\.", f"language_model.{lm_prefix}."),
        (r"^language_model\.model\.", f"language_model.{lm_prefix}."),
        (r"^(?:language_model\.)?lm_head\.", "language_model.lm_head."),
        (r"^(?:model\.)?image_newline$", "image_newline"),  # LLaVA-NeXT's row separator
    ]


def original_rules(lm_prefix: str, projector_type: str) -> list[tuple[str, str]]:
    """The original LLaVA checkpoint: a `*ForCausalLM` state dict plus `model.mm_projector.*` (and maybe the tower)."""
    projector = (
        [(r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
         (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2.")]
        if projector_type == "mlp2x_gelu"
        else [(r"^model\.mm_projector\.", "multi_modal_projector.linear_1.")]
    )
    return projector + [
        # LLaVA's own training saves the CLIP tower too, as `CLIPVisionModel` nested in its `CLIPVisionTower`
        (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?", "vision_tower."),
        # rotary inverse frequencies some releases carry: derived from the config, not weights
        (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", None),
        (r"^model\.", f"language_model.{lm_prefix}."),
        (r"^lm_head\.", "language_model.lm_head."),
    ]


# The original LLaVA config: LM fields plus these training/multimodal fields, which the LM config must not keep.
ORIGINAL_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
ORIGINAL_LM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
ORIGINAL_EXTRA_FIELDS = {
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "use_mm_proj", "unfreeze_mm_vision_tower",
}


# ---- llava-hf --------------------------------------------------------------------------------------------------
def llava_hf_source(args, expected: str):
    """The config of a transformers LLaVA checkpoint (`expected` its `model_type`), refused in one line where the
    family cannot take it (another model type, several vision feature layers, a projector activation other than
    GELU)."""
    source = AutoConfig.from_pretrained(args.input)
    if source.model_type != expected:
        raise ConversionError(f"--source {args.source} expects a `{expected}` config, {args.input} holds "
                              f"{source.model_type!r}.")
    if not isinstance(source.vision_feature_layer, int):
        raise ConversionError(f"Several vision feature layers ({source.vision_feature_layer}) are not supported.")
    if source.projector_hidden_act != "gelu":
        raise ConversionError(f"Projector activation {source.projector_hidden_act!r} is not supported (only gelu).")
    return source


def llava_hf_config(source, **fields) -> FusionLlavaConfig:
    """The fusion_llava config of a transformers LLaVA config: its backbones (the LM tying its head when either
    config says so), the 2-layer GELU projector, the feature layer and strategy, `<image>`; `fields` add or replace."""
    text_config = source.text_config
    text_config.tie_word_embeddings = bool(source.tie_word_embeddings or text_config.tie_word_embeddings)
    return FusionLlavaConfig(**{
        "vision_config": source.vision_config, "text_config": text_config, "projector_type": "mlp2x_gelu",
        "projector_bias": source.multimodal_projector_bias, "vision_feature_layer": source.vision_feature_layer,
        "vision_feature_select_strategy": source.vision_feature_select_strategy,
        "image_token_id": source.image_token_id, **fields})


def convert_llava_hf(args):
    """transformers' Llava, or (`--source llava-next`) LlavaNext with its dynamic-resolution tiling."""
    next_ = args.source == "llava-next"
    source = llava_hf_source(args, "llava_next" if next_ else "llava")
    config = llava_hf_config(source, image_grid_pinpoints=source.image_grid_pinpoints if next_ else None)
    state_dict = rename_keys(read_state_dict(args.input), llava_hf_rules(conversion.lm_base_prefix(config.text_config)))
    source_processor = AutoProcessor.from_pretrained(args.input)
    processor = FusionLlavaProcessor(
        image_processor=source_processor.image_processor,
        tokenizer=source_processor.tokenizer,
        chat_template=source_processor.chat_template,
        image_seq_length=config.num_image_tokens(),
        patch_size=source.vision_config.patch_size if next_ else None,
    )
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    reference_cls = LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration
    reference = conversion.transformers_reference(reference_cls, args.input, args.dtype, source_processor, PROMPT)
    write_and_compare_logits(args, config, state_dict, processor, reference)


# ---- original LLaVA ----------------------------------------------------------------------------------------------
def convert_original(args):
    if not args.vision_tower:
        raise ConversionError("--source original needs --vision-tower DIR (the CLIP tower is not in the checkpoint).")
    with open(os.path.join(args.input, "config.json")) as f:
        raw = json.load(f)
    lm_type = ORIGINAL_LM_TYPES.get(raw.get("model_type"))
    if lm_type is None:
        raise ConversionError(f"Unknown LLaVA model_type {raw.get('model_type')!r}; known: {sorted(ORIGINAL_LM_TYPES)}.")
    if raw.get("mm_use_im_start_end"):
        raise ConversionError("Checkpoints trained with image start/end tokens (mm_use_im_start_end) are not supported.")
    if raw.get("image_aspect_ratio") == "anyres" or raw.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError("LLaVA-NeXT style any-resolution checkpoints are not supported.")
    projector_type = raw.get("mm_projector_type", "linear")
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature not in ORIGINAL_SELECT_FEATURE:
        raise ConversionError(f"mm_vision_select_feature {select_feature!r} is not supported.")
    text_fields = {
        k: v for k, v in raw.items()
        if not k.startswith("mm_") and k not in ORIGINAL_EXTRA_FIELDS | {"model_type", "architectures"}
    }
    text_config = AutoConfig.for_model(lm_type, **text_fields)
    tokenizer = AutoTokenizer.from_pretrained(args.input)
    pad = raw.get("image_aspect_ratio") == "pad"
    # The token sequence and the image framing the model was trained with: `tokenizer_image_token`, `expand2square`.
    processor = FusionLlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(args.vision_tower),
                                     tokenizer=tokenizer, chunked_tokenization=True, pad_to_square=pad)
    vision_tower = load_vision_tower(args.vision_tower)
    config = FusionLlavaConfig(
        vision_config=vision_tower.config,
        text_config=text_config,
        projector_type=projector_type,
        vision_feature_layer=raw["mm_vision_select_layer"],
        vision_feature_select_strategy=ORIGINAL_SELECT_FEATURE[select_feature],
        image_token_id=processor.image_token_id,
    )
    processor.image_seq_length = config.num_image_tokens()
    if pad:
        print("[note] the checkpoint was trained on images padded to a square: the processor pads them too.")
    source = read_state_dict(args.input)
    state_dict = rename_keys(source, original_rules(conversion.lm_base_prefix(text_config), projector_type))
    if not any(k.startswith("vision_tower.") for k in state_dict):
        state_dict.update({f"vision_tower.{k}": v for k, v in vision_tower.state_dict().items()})

    def reference(processor_inputs):
        # The original forward: the LM (a plain *ForCausalLM on these weights), the tower, an nn.Sequential projector,
        # and the single IMAGE_TOKEN_INDEX position replaced by the projected patch features.
        lm = AutoModelForCausalLM.from_pretrained(args.input, config=text_config, dtype=args.dtype).eval()
        tower = vision_tower.to(args.dtype).eval()
        prefix = "model.mm_projector."
        weights = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
        d_v, d = raw.get("mm_hidden_size", vision_tower.config.hidden_size), text_config.hidden_size
        mm_projector = (
            nn.Sequential(nn.Linear(d_v, d), nn.GELU(), nn.Linear(d, d)) if projector_type == "mlp2x_gelu" else nn.Linear(d_v, d)
        )
        mm_projector.load_state_dict(weights)
        image = processor.image_processor(sample_image(), return_tensors="pt")["pixel_values"].to(args.dtype)
        features = tower(image, output_hidden_states=True).hidden_states[raw["mm_vision_select_layer"]]
        if select_feature == "patch":
            features = features[:, 1:]
        image_embeds = mm_projector(features.float())[0].to(args.dtype)
        # `tokenizer_image_token`: each chunk tokenized alone, the BOS kept once, one image position between.
        before, after = (tokenizer(chunk).input_ids for chunk in PROMPT.split("<image>"))
        offset = int(bool(before) and before[0] == tokenizer.bos_token_id)
        embed = lm.get_input_embeddings()
        ids_before, ids_after = torch.tensor(before[:offset] + before[offset:]), torch.tensor(after[offset:])
        embeds = torch.cat([embed(ids_before), image_embeds, embed(ids_after)])[None]
        return lm(inputs_embeds=embeds).logits

    write_and_compare_logits(args, config, state_dict, processor, reference)


# ---- shared -------------------------------------------------------------------------------------------------------
def write_and_compare_logits(args, config, state_dict, processor, reference):
    """Write the model, then compare its logits on the sample prompt with `reference(inputs)`'s."""
    def verify(path):
        converted_processor = FusionLlavaProcessor.from_pretrained(path)
        model = FusionLlavaForConditionalGeneration.from_pretrained(path, dtype=args.dtype).eval()
        inputs = converted_processor(images=sample_image(), text=PROMPT, return_tensors="pt")
        compare_logits(f"{args.source} vs converted", model(**inputs).logits, reference(inputs), args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionLlavaForConditionalGeneration,
                                config=config, state_dict=state_dict, processor=processor, verify=verify)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["llava-hf", "llava-next", "original"], required=True)
    parser.add_argument("--input", required=True, help="checkpoint directory")
    parser.add_argument("--vision-tower", help="CLIP vision tower directory (--source original)")
    conversion.add_common_arguments(parser)
    return conversion.check_common_arguments(parser, parser.parse_args(argv))


def main(argv=None, prog=None):
    args = parse_args(argv, prog)
    return conversion.run((convert_original if args.source == "original" else convert_llava_hf), args)


if __name__ == "__main__":
    sys.exit(main())
