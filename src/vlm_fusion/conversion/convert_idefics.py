"""Convert an IDEFICS checkpoint (transformers' IdeficsForVisionText2Text, HuggingFaceM4/idefics-9b and friends) into a
vlm-fusion `fusion_flamingo` model with its processor.

    vlm-fusion convert idefics --input DIR --output DIR

IDEFICS is a Flamingo: a CLIP-style tower, a perceiver resampler, and gated cross-attention blocks in front of decoder
layers 0, k, 2k, ... of a Llama decoder. What differs from OpenFlamingo maps onto the family's options: blocks with
RMSNorm and the LM's SwiGLU feed-forward (`cross_attention_style="idefics"`), per-unit gates (`gate_shape="vector"`
for `alpha_type="vector"`), a ReLU resampler feed-forward. The decoupled embeddings and head (the LM's vocabulary plus
IDEFICS's additional tokens) become one `LlamaForCausalLM` embedding and head. Every source key must be consumed and
every weight filled, or nothing is written; before finishing the script compares the written model's logits with
transformers' IDEFICS on a prompt with two images.
"""

import argparse
import sys

import torch
from transformers import AutoProcessor, CLIPVisionConfig, IdeficsConfig, LlamaConfig

from vlm_fusion import FusionFlamingoConfig, FusionFlamingoForConditionalGeneration, FusionIdeficsProcessor
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, rename_keys, sample_image

# IDEFICS wraps each run of images in <fake_token_around_image>; the check's prompt holds two images.
FAKE, IMAGE = "<fake_token_around_image>", "<image>"
PROMPT_START, PROMPT_END = "User:", "What do the two images show?<end_of_utterance>\nAssistant:"


# One IDEFICS gated block (`model.gated_cross_attn_layers.J.*`) -> ours.
GATED_BLOCK_RULES = [
    (r"input_layernorm\.", "attn.norm."),
    (r"cross_attn\.q_proj\.", "attn.to_q."),
    (r"cross_attn\.(k|v)_proj\.", r"attn.\2_proj."),  # fused into to_kv by merge_tables
    (r"cross_attn\.o_proj\.", "attn.to_out."),
    (r"post_attention_layernorm\.", "ff.norm."),
    (r"mlp\.", "ff."),
    (r"alpha_cross_attn$", "attn_gate"),
    (r"alpha_dense$", "ff_gate"),
]


def rules(interval: int) -> list[tuple[str, str | None]]:
    """IDEFICS keys -> the parts layout; `.k_proj` / `.v_proj` pairs and decoupled tables are merged afterwards."""
    def block(index: str) -> str:  # the J-th gated block sits before decoder layer J * interval
        return f"language_model.model.layers.{int(index) * interval}.gated_cross_attn_layer."

    return [
        (r"^model\.vision_model\.", "vision_tower."),
        (r"^model\.perceiver_resampler\.latents$", "perceiver.latents"),
        (r"^model\.perceiver_resampler\.layer_norm\.", "perceiver.norm."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.0\.context_layer_norm\.", r"perceiver.layers.\1.attn.norm_media."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.0\.latents_layer_norm\.", r"perceiver.layers.\1.attn.norm_latents."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.0\.q_proj\.", r"perceiver.layers.\1.attn.to_q."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.0\.(k|v)_proj\.", r"perceiver.layers.\1.attn.\2_proj."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.0\.output_proj\.", r"perceiver.layers.\1.attn.to_out."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.1\.ln\.", r"perceiver.layers.\1.ff.0."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.1\.fc\.", r"perceiver.layers.\1.ff.1."),
        (r"^model\.perceiver_resampler\.blocks\.(\d+)\.1\.c_proj\.", r"perceiver.layers.\1.ff.3."),
        *[(rf"^model\.gated_cross_attn_layers\.(\d+)\.{src}", lambda m, dst=dst: block(m.group(1)) + m.expand(dst))
          for src, dst in GATED_BLOCK_RULES],
        (r"^model\.embed_tokens\.additional_embedding\.", "language_model.model.embed_tokens.additional."),
        (r"^model\.", "language_model.model."),
        (r"^lm_head\.additional_fc\.", "language_model.lm_head.additional."),
        (r"^lm_head\.", "language_model.lm_head."),
    ]


def merge_tables(state: dict) -> dict:
    """Separate k/v projections -> our fused `to_kv` (k first); decoupled vocabulary tables -> one table each."""
    bridge = ("perceiver.", "gated_cross_attn_layer.")  # the LM's and the tower's own k/v stay as they are
    for key in [k for k in state if k.endswith(".k_proj.weight") and any(b in k for b in bridge)]:
        prefix = key[: -len("k_proj.weight")]
        state[prefix + "to_kv.weight"] = torch.cat([state.pop(key), state.pop(prefix + "v_proj.weight")])
    for table in ("language_model.model.embed_tokens", "language_model.lm_head"):
        if f"{table}.additional.weight" in state:
            state[f"{table}.weight"] = torch.cat([state[f"{table}.weight"], state.pop(f"{table}.additional.weight")])
    return state


def fusion_config(source: IdeficsConfig, image_token_id: int, end_of_chunk_token_id: int) -> FusionFlamingoConfig:
    perceiver, vision = source.perceiver_config, source.vision_config
    if not source.use_resampler:
        raise ConversionError("IDEFICS without its perceiver resampler (use_resampler=False) is not supported.")
    if source.qk_layer_norms or perceiver.qk_layer_norms_perceiver:
        raise ConversionError("IDEFICS with query/key layer norms (qk_layer_norms) is not supported.")
    text = LlamaConfig(
        vocab_size=source.vocab_size + source.additional_vocab_size, hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads, num_key_value_heads=source.num_attention_heads,
        hidden_act=source.hidden_act, rms_norm_eps=source.rms_norm_eps,
        max_position_embeddings=source.max_position_embeddings, rope_parameters=source.rope_parameters,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
        tie_word_embeddings=False,
    )
    tower = CLIPVisionConfig(
        hidden_size=vision.embed_dim, intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads, image_size=vision.image_size, patch_size=vision.patch_size,
        hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps, num_channels=vision.num_channels,
    )
    return FusionFlamingoConfig(
        vision_config=tower, text_config=text,
        vision_feature_layer=-1, vision_feature_select_strategy="full",  # IDEFICS resamples every token, CLS too
        num_latents=perceiver.resampler_n_latents, perceiver_depth=perceiver.resampler_depth,
        perceiver_heads=perceiver.resampler_n_heads, perceiver_head_dim=perceiver.resampler_head_dim,
        perceiver_ff_mult=4, perceiver_activation="relu",
        cross_attention_heads=source.num_attention_heads,
        cross_attention_head_dim=source.hidden_size // source.num_attention_heads,
        cross_attention_layers=list(range(0, source.num_hidden_layers, source.cross_layer_interval)),
        cross_attention_style="idefics", gate_shape="vector" if source.alpha_type == "vector" else "scalar",
        image_token_id=image_token_id, end_of_chunk_token_id=end_of_chunk_token_id,
        origin="Converted from an IDEFICS checkpoint (transformers' IdeficsForVisionText2Text).",
    )


def convert(args):
    source = IdeficsConfig.from_pretrained(args.input)
    if source.model_type != "idefics":
        raise ConversionError(f"--input must hold an `idefics` config, {args.input} holds {source.model_type!r}.")
    source_processor = AutoProcessor.from_pretrained(args.input)
    processor = FusionIdeficsProcessor(image_processor=source_processor.image_processor,
                                       tokenizer=source_processor.tokenizer, image_token=IMAGE, image_wrapper_token=FAKE,
                                       end_of_chunk_token="<end_of_utterance>")
    config = fusion_config(source, processor.image_token_id, processor.end_of_chunk_token_id)
    if len(processor.tokenizer) > config.text_config.vocab_size:
        raise ConversionError(f"The tokenizer has {len(processor.tokenizer)} tokens, the LM "
                              f"{config.text_config.vocab_size} rows.")
    state = merge_tables(rename_keys(read_state_dict(args.input), rules(source.cross_layer_interval)))

    def verify(path):
        from transformers import IdeficsForVisionText2Text

        model = FusionFlamingoForConditionalGeneration.from_pretrained(path, dtype=args.dtype).eval()
        converted = FusionIdeficsProcessor.from_pretrained(path)
        images = [sample_image(source.vision_config.image_size, seed=0), sample_image(source.vision_config.image_size, seed=1)]
        prompt = [PROMPT_START, images[0], images[1], PROMPT_END]  # an interleaved sample, as IDEFICS users write it
        inputs = converted(text=[prompt], return_tensors="pt")
        reference_inputs = source_processor(text=[prompt], return_tensors="pt")
        if not torch.equal(inputs["input_ids"], reference_inputs["input_ids"]):
            raise ConversionError("The converted processor tokenizes the sample prompt differently from IDEFICS'.")
        reference = IdeficsForVisionText2Text.from_pretrained(args.input, dtype=args.dtype).eval()
        compare_logits("IDEFICS vs converted", model(**inputs).logits, reference(**reference_inputs).logits, args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionFlamingoForConditionalGeneration,
                                config=config, state_dict=state, processor=processor, verify=verify)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an IdeficsForVisionText2Text directory with its processor")
    conversion.add_common_arguments(parser)
    return conversion.check_common_arguments(parser, parser.parse_args(argv))


def main(argv=None, prog=None):
    return conversion.run(convert, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())
