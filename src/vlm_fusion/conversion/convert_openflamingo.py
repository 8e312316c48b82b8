"""Convert a released OpenFlamingo checkpoint into a vlm-fusion `fusion_flamingo` model with its processor.

    vlm-fusion convert openflamingo --checkpoint checkpoint.pt --vision-tower CLIP_DIR \\
        --language-model LM_DIR --cross-attention-every-n-layers N --output DIR

The checkpoint is OpenFlamingo's flat state dict: `perceiver.*`, the gated blocks under
`lang_encoder.<decoder layers>.{i}.gated_cross_attn_layer.*` (and their alias `lang_encoder.gated_cross_attn_layers.*`),
the trained embeddings, and possibly aliases of frozen LM weights; the CLIP tower and the base LM come from their
directories. The released vision features are CLIP patch tokens (CLS dropped) before `ln_post`: the converted
model takes `hidden_states[-1][:, 1:]` of the transformers CLIP tower, which are the same features.

Every key must be consumed and every weight filled, or nothing is written. When OpenFlamingo's modules are
installed (`pip install --no-deps open-flamingo==2.0.1 einops einops-exts`), the script rebuilds the source model
with them and compares logits on an interleaved two-image prompt.
"""

import argparse
import importlib
import importlib.util
import sys
import types

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from vlm_fusion import FusionFlamingoConfig, FusionFlamingoForConditionalGeneration, FusionFlamingoProcessor
from vlm_fusion.modeling_flamingo import find_decoder_layers
from vlm_fusion.conversion import common as conversion
from vlm_fusion.conversion.common import ConversionError, compare_logits, read_state_dict, sample_image
from vlm_fusion.vision import load_vision_tower

PROMPT = "<image>An image of a circle.<|endofchunk|><image>An image of a"


def rules(layers: str) -> list[tuple[str, str | None]]:
    """OpenFlamingo keys (with `lang_encoder.` stripped off the LM side) -> ours. `layers`: the LM's decoder path."""
    l = layers.replace(".", r"\.")
    return [
        (r"^vision_encoder\.", "UNSUPPORTED"),
        (r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1.attn."),
        (r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.ff."),
        (r"^perceiver\.", "perceiver."),
        (rf"^lang_encoder\.{l}\.(\d+)\.gated_cross_attn_layer\.", rf"language_model.{layers}.\1.gated_cross_attn_layer."),
        (r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.", rf"language_model.{layers}.\1.gated_cross_attn_layer."),
        (rf"^lang_encoder\.{l}\.(\d+)\.decoder_layer\.", rf"language_model.{layers}.\1."),
        (r"^lang_encoder\.old_decoder_blocks\.(\d+)\.", rf"language_model.{layers}.\1."),
        (r"^lang_encoder\.", "language_model."),
    ]


def rename_with_aliases(source: dict, table) -> dict:
    """Apply `table`; OpenFlamingo saves shared modules under two names, so equal duplicates collapse to one."""
    renamed = {}
    for key, tensor in source.items():
        mapped = conversion.rename_keys({key: tensor}, table)
        (target, value), = mapped.items()
        if target == "UNSUPPORTED":
            raise ConversionError(f"{key}: vision-encoder weights in the checkpoint are not supported "
                                  "(the tower comes from --vision-tower).")
        if target in renamed and not torch.equal(renamed[target], value):
            raise ConversionError(f"{key} and another alias of {target} hold different tensors.")
        renamed[target] = value
    return renamed


def read_architecture(state: dict, args, num_lm_layers: int, layers: str) -> dict:
    """The bridge's shape, read off the weights (a released checkpoint carries no config)."""
    latents = state["perceiver.latents"]
    depth = len({k.split(".")[2] for k in state if k.startswith("perceiver.layers.")})
    prefix = f"language_model.{layers}."
    gated = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                    if k.startswith(prefix) and ".gated_cross_attn_layer." in k})
    block = f"{prefix}{{}}.gated_cross_attn_layer."
    expected = [i for i in range(num_lm_layers) if (i + 1) % args.cross_attention_every_n_layers == 0]
    if gated != expected:
        raise ConversionError(f"The checkpoint has gated blocks before layers {gated}; "
                              f"--cross-attention-every-n-layers {args.cross_attention_every_n_layers} places them at {expected}.")
    perceiver_inner = state["perceiver.layers.0.attn.to_q.weight"].shape[0]
    xattn_inner, text_dim = state[block.format(gated[0]) + "attn.to_q.weight"].shape
    return dict(
        num_latents=latents.shape[0], perceiver_depth=depth, perceiver_heads=args.perceiver_heads,
        perceiver_head_dim=perceiver_inner // args.perceiver_heads,
        perceiver_ff_mult=state["perceiver.layers.0.ff.1.weight"].shape[0] // latents.shape[1],
        max_num_media=state["perceiver.media_time_embs"].shape[0] if "perceiver.media_time_embs" in state else None,
        max_num_frames=state["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in state else None,
        cross_attention_heads=args.cross_attention_heads, cross_attention_head_dim=xattn_inner // args.cross_attention_heads,
        cross_attention_ff_mult=state[block.format(gated[0]) + "ff.1.weight"].shape[0] // text_dim,
        cross_attention_every_n_layers=args.cross_attention_every_n_layers,
    )


def convert(args):
    source = read_state_dict(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.language_model)
    processor = FusionFlamingoProcessor(image_processor=AutoImageProcessor.from_pretrained(args.vision_tower),
                                        tokenizer=tokenizer)
    text_config = AutoConfig.from_pretrained(args.language_model)
    with torch.device("meta"):
        meta_lm = AutoModelForCausalLM.from_config(text_config)
    layers_path, _ = find_decoder_layers(meta_lm)
    embedding_key = "language_model." + next(
        name for name, param in meta_lm.named_parameters() if param is meta_lm.get_input_embeddings().weight
    )
    state = rename_with_aliases(source, rules(layers_path))
    vocab = state[embedding_key].shape[0] if embedding_key in state else text_config.vocab_size
    if vocab != len(tokenizer):
        raise ConversionError(f"The checkpoint's embeddings have {vocab} rows; the tokenizer with OpenFlamingo's "
                              f"special tokens has {len(tokenizer)}.")
    text_config.vocab_size = vocab
    tower = load_vision_tower(args.vision_tower)
    config = FusionFlamingoConfig(
        vision_config=tower.config, text_config=text_config, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_token_id=processor.image_token_id,
        end_of_chunk_token_id=processor.end_of_chunk_token_id,
        **read_architecture(state, args, text_config.num_hidden_layers, layers_path),
    )
    state.update({f"vision_tower.{k}": v for k, v in tower.state_dict().items()})
    lm = AutoModelForCausalLM.from_pretrained(args.language_model)
    lm.resize_token_embeddings(vocab)
    for key, value in lm.state_dict().items():  # frozen LM weights the checkpoint does not hold
        state.setdefault(f"language_model.{key}", value)

    def verify(path):
        model = FusionFlamingoForConditionalGeneration.from_pretrained(path, dtype=args.dtype).eval()
        converted = FusionFlamingoProcessor.from_pretrained(path)
        images = [sample_image(seed=0), sample_image(seed=1)]
        inputs = converted(images=[images], text=[PROMPT], return_tensors="pt")
        if not torch.equal(inputs["input_ids"], tokenizer([PROMPT], return_tensors="pt")["input_ids"]):
            raise ConversionError("The converted processor's ids differ from the tokenizer's.")
        ours = model(**inputs).logits
        if args.no_verify:
            print("[verify] skipped (--no-verify): the logits were not compared with OpenFlamingo")
            return
        try:
            reference = open_flamingo_reference(args, source, config, tokenizer)
        except ImportError as error:
            raise ConversionError(
                "OpenFlamingo's modules are needed to verify the conversion "
                "(pip install --no-deps open-flamingo==2.0.1 einops einops-exts), or pass --no-verify."
            ) from error
        vision_x = inputs["pixel_values"].to(args.dtype)[None, :, None]  # (B, T_img, F, C, H, W)
        expected = reference(vision_x=vision_x, lang_x=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        compare_logits("OpenFlamingo vs converted", ours, expected, args.atol)

    conversion.write_and_verify(args.output, overwrite=args.overwrite, model_cls=FusionFlamingoForConditionalGeneration,
                                config=config, state_dict=state, processor=processor, verify=verify)


# ---- the reference: OpenFlamingo's own modules -------------------------------------------------------------------
def import_open_flamingo():
    """`open_flamingo.src.{flamingo, flamingo_lm, utils}` without the package `__init__` (it needs open_clip)."""
    if "open_flamingo" not in sys.modules:
        spec = importlib.util.find_spec("open_flamingo")
        if spec is None:
            raise ImportError("open_flamingo is not installed")
        package = types.ModuleType("open_flamingo")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["open_flamingo"] = package
    return (importlib.import_module("open_flamingo.src.flamingo"), importlib.import_module("open_flamingo.src.flamingo_lm"),
            importlib.import_module("open_flamingo.src.utils"))


class OpenClipLikeVisual(torch.nn.Module):
    """What OpenFlamingo calls on `vision_encoder.visual`: returns `(pooled, patch tokens before ln_post)`."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[-1]
        return hidden[:, 0], hidden[:, 1:]


def build_open_flamingo(tower, lm, *, media_token_id, eoc_token_id, cross_attn_every_n_layers, layers_path):
    """An OpenFlamingo `Flamingo` around a transformers CLIP tower and causal LM (modified in place)."""
    flamingo, flamingo_lm, utils = import_open_flamingo()
    utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(layers_path)
    return flamingo.Flamingo(types.SimpleNamespace(visual=OpenClipLikeVisual(tower)), lm, eoc_token_id=eoc_token_id,
                             media_token_id=media_token_id, vis_dim=tower.config.hidden_size,
                             cross_attn_every_n_layers=cross_attn_every_n_layers)


def open_flamingo_reference(args, source, config, tokenizer):
    lm = AutoModelForCausalLM.from_pretrained(args.language_model, dtype=args.dtype)
    lm.resize_token_embeddings(len(tokenizer))
    model = build_open_flamingo(load_vision_tower(args.vision_tower, dtype=args.dtype), lm,
                                media_token_id=config.image_token_id, eoc_token_id=config.end_of_chunk_token_id,
                                cross_attn_every_n_layers=args.cross_attention_every_n_layers,
                                layers_path=find_decoder_layers(lm)[0])
    missing, unexpected = model.load_state_dict(source, strict=False)
    if unexpected:
        raise ConversionError(f"OpenFlamingo itself does not take these checkpoint keys: {unexpected[:8]}")
    return model.to(args.dtype).eval()


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="OpenFlamingo checkpoint.pt")
    parser.add_argument("--vision-tower", required=True, help="transformers CLIP directory with its image processor")
    parser.add_argument("--language-model", required=True, help="the base causal LM directory with its tokenizer")
    parser.add_argument("--cross-attention-every-n-layers", type=int, required=True)
    parser.add_argument("--perceiver-heads", type=int, default=8, help="8 in the released checkpoints")
    parser.add_argument("--cross-attention-heads", type=int, default=8, help="8 in the released checkpoints")
    parser.add_argument("--no-verify", action="store_true", help="write without comparing logits with OpenFlamingo")
    conversion.add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.input = args.checkpoint
    return conversion.check_common_arguments(parser, args)


def main(argv=None, prog=None):
    return conversion.run(convert, parse_args(argv, prog))


if __name__ == "__main__":
    sys.exit(main())
