"""The models the benchmarks compare, built with random weights at a chosen size.

Reference models are built with transformers' own classes (and OpenFlamingo's), saved, and converted with our
conversion scripts, so both sides of every comparison hold identical weights.
"""

import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, CLIPImageProcessorPil, CLIPVisionModel

from vlm_fusion.conversion import convert_blip2, convert_idefics, convert_llava, convert_openflamingo
from vlm_fusion.tools.tiny import tiny_text_config, tiny_tokenizer, tiny_vision_config

SIZES = {
    # a smoke size for the test suite
    "tiny": dict(vision=dict(tiny_vision_config("clip")), lm=dict(tiny_text_config("llama", vocab_size=128)),
                 qformer=dict(hidden=64, layers=2, heads=4, ffn=128, queries=8),
                 flamingo=dict(latents=8, depth=1, heads=2, head_dim=32, every_n=1), image_size=32,
                 resolutions=(32, 48, 64), image_counts=(1, 2), frames=(2, 4)),
    # CLIP-B/16-sized tower, a 12-layer 1024-wide Llama-style LM (~270M parameters together)
    "default": dict(vision=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                                num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=224),
                    lm=dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                            num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
                    qformer=dict(hidden=768, layers=12, heads=12, ffn=3072, queries=32),
                    flamingo=dict(latents=64, depth=6, heads=8, head_dim=64, every_n=2), image_size=224,
                    resolutions=(224, 336, 448), image_counts=(1, 4, 8), frames=(8, 16, 32)),
    # CLIP-L/14-336-sized tower, a 24-layer 2048-wide LM (~1.3B parameters)
    "large": dict(vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=336),
                  lm=dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
                  qformer=dict(hidden=768, layers=12, heads=12, ffn=3072, queries=32),
                  flamingo=dict(latents=64, depth=6, heads=8, head_dim=64, every_n=4), image_size=336,
                  resolutions=(224, 336, 448), image_counts=(1, 4, 8), frames=(8, 16, 32)),
}
for _size in SIZES.values():
    _size["lm"].update(bos_token_id=1, eos_token_id=2, pad_token_id=3)

LLAVA_PROMPT = "USER: <image>\nwhat is shown in this image ? ASSISTANT:"
VIDEO_PROMPT = "USER: <video>\nwhat happens in this clip ? ASSISTANT:"
BLIP2_PROMPT = "Question: what is shown in this image ? Answer:"
FLAMINGO_PROMPT = "<image>a red circle<|endofchunk|><image>a blue square<|endofchunk|><image>a star<|endofchunk|><image>a"


def vision_config(size, image_size=None):
    return {**size["vision"], "image_size": image_size or size["image_size"]}


def image_processor(image_size):
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def convert(module, argv):
    if module.main(argv) != 0:
        raise RuntimeError(f"{module.__name__} failed")


def build_llava(root, size):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = {k: v for k, v in vision_config(size).items() if k != "model_type"}
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model", **vision}, text_config=size["lm"],
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    hf_dir, ours_dir = os.path.join(root, "llava_hf"), os.path.join(root, "llava_ours")
    LlavaForConditionalGeneration(config).save_pretrained(hf_dir)
    LlavaProcessor(image_processor=image_processor(size["image_size"]), tokenizer=tokenizer,
                   patch_size=size["vision"]["patch_size"], vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(hf_dir)
    convert(convert_llava, ["--source", "llava-hf", "--input", hf_dir, "--output", ours_dir, "--atol", "1e-3"])
    return hf_dir, ours_dir


def build_llava_onevision(root, size):
    """transformers' LlavaOnevision at the size's tower (as SigLIP) and LM (anyres_max_9 over 2x2 tiles, bilinear video pooling,
    a newline after each clip), saved with its processor's settings, and our conversion of it."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from vlm_fusion.conversion import convert_llava_video

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tile = size["image_size"]
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    vision = {k: v for k, v in vision_config(size).items() if k != "model_type"}
    # OneVision's own tower family: SigLIP (no CLS token, every token a patch: "full"), at the size's tower dims
    config = LlavaOnevisionConfig(vision_config={"model_type": "siglip_vision_model", **vision}, text_config=size["lm"],
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
                                  vision_feature_select_strategy="full", vision_feature_layer=-1)
    hf_dir, ours_dir = os.path.join(root, "llava_onevision_hf"), os.path.join(root, "llava_onevision_ours")
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(hf_dir)
    image_proc = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints)
    patches = (tile // size["vision"]["patch_size"]) ** 2
    convert_llava_video.without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_proc, tokenizer=tokenizer, num_image_tokens=patches,
        vision_feature_select_strategy="full").save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "video_preprocessor_config.json"), "w") as f:  # its video processor's settings
        f.write('{"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": %d, "width": %d}}' % (tile, tile))
    convert(convert_llava_video, ["--source", "llava-onevision", "--input", hf_dir, "--output", ours_dir,
                                  "--atol", "1e-3"])
    return hf_dir, ours_dir


def build_blip2(root, size):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.image_token = "<image>"
    q = size["qformer"]
    vision = {k: v for k, v in vision_config(size).items() if k != "model_type"}
    config = Blip2Config(
        vision_config=vision, text_config=size["lm"], num_query_tokens=q["queries"],
        qformer_config=dict(hidden_size=q["hidden"], num_hidden_layers=q["layers"], num_attention_heads=q["heads"],
                            intermediate_size=q["ffn"], encoder_hidden_size=vision["hidden_size"]),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    hf_dir, ours_dir = os.path.join(root, "blip2_hf"), os.path.join(root, "blip2_ours")
    Blip2ForConditionalGeneration(config).save_pretrained(hf_dir)
    Blip2Processor(image_processor=image_processor(size["image_size"]), tokenizer=tokenizer,
                   num_query_tokens=q["queries"]).save_pretrained(hf_dir)
    convert(convert_blip2, ["--source", "hf", "--input", hf_dir, "--output", ours_dir, "--atol", "1e-3"])
    return hf_dir, ours_dir


def open_flamingo_available() -> bool:
    return importlib.util.find_spec("open_flamingo") is not None and importlib.util.find_spec("einops_exts") is not None


def build_flamingo(root, size):
    """OpenFlamingo (its own modules) saved as a released-style checkpoint, and our conversion of it."""
    f = size["flamingo"]
    clip_dir, lm_dir = os.path.join(root, "clip"), os.path.join(root, "lm")
    CLIPVisionModel(AutoConfig.for_model(**vision_config(size))).save_pretrained(clip_dir)
    image_processor(size["image_size"]).save_pretrained(clip_dir)
    tokenizer = tiny_tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**size["lm"]))
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    lm.resize_token_embeddings(len(tokenizer))
    tower = CLIPVisionModel.from_pretrained(clip_dir)
    model = convert_openflamingo.build_open_flamingo(
        tower, lm, media_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        eoc_token_id=tokenizer.convert_tokens_to_ids("<|endofchunk|>"), cross_attn_every_n_layers=f["every_n"],
        layers_path="model.layers")
    # OpenFlamingo's resampler and blocks use its defaults (8 heads of 64, 64 latents, depth 6).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(0.5)
    trainable = {n for n, p in model.named_parameters()
                 if n.startswith("perceiver.") or "gated_cross_attn" in n or "embed_tokens" in n}
    state = {k: v for k, v in model.state_dict().items() if k in trainable or "gated_cross_attn_layers" in k}
    checkpoint, ours_dir = os.path.join(root, "checkpoint.pt"), os.path.join(root, "flamingo_ours")
    torch.save(state, checkpoint)
    convert(convert_openflamingo, ["--checkpoint", checkpoint, "--vision-tower", clip_dir, "--language-model", lm_dir,
                                     "--cross-attention-every-n-layers", str(f["every_n"]), "--output", ours_dir,
                                     "--atol", "1e-3"])
    return dict(checkpoint=checkpoint, vision_tower=clip_dir, language_model=lm_dir, ours=ours_dir,
                every_n=f["every_n"])


# [text before the images, text after them]: a list, as a spec is JSON (each footprint is measured in a fresh process)
IDEFICS_SAMPLE = ["User:", "what is shown in these images ?"]


def build_idefics(root, size):
    """transformers' IDEFICS at the benchmark size (its gates opened), saved, and our conversion of it."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    v, lm, f = size["vision"], size["lm"], size["flamingo"]
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<end_of_utterance>"]})
    config = IdeficsConfig(
        vocab_size=lm["vocab_size"], additional_vocab_size=2, hidden_size=lm["hidden_size"],
        intermediate_size=lm["intermediate_size"], num_hidden_layers=lm["num_hidden_layers"],
        num_attention_heads=lm["num_attention_heads"], cross_layer_interval=f["every_n"], use_resampler=True,
        vision_config=dict(embed_dim=v["hidden_size"], image_size=v["image_size"], patch_size=v["patch_size"],
                           num_hidden_layers=v["num_hidden_layers"], num_attention_heads=v["num_attention_heads"],
                           intermediate_size=v["intermediate_size"]),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=f["latents"], resampler_depth=f["depth"],
                              resampler_n_heads=f["heads"], resampler_head_dim=f["head_dim"]),
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    model = IdeficsForVisionText2Text(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "alpha" in name:
                param.fill_(0.5)
    source, ours = os.path.join(root, "idefics"), os.path.join(root, "idefics_ours")
    model.save_pretrained(source)
    IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=v["image_size"]), tokenizer=tokenizer,
                     image_size=v["image_size"]).save_pretrained(source)
    convert(convert_idefics, ["--input", source, "--output", ours, "--atol", "1e-3"])
    return dict(reference=source, ours=ours)


# Each family's video path and the knob it has (the clip trade-off study): name -> (family, config fields)
VIDEO_SETUPS = {
    "llava, pooled 2 (NeXT-Video)": ("fusion_llava", dict(video_pooling="average", video_pool_stride=2)),
    "llava, every patch": ("fusion_llava", dict(video_pooling=None)),
    "llava, pooled 4": ("fusion_llava", dict(video_pooling="average", video_pool_stride=4)),
    "llava, bilinear + newline (OneVision)": ("fusion_llava", dict(video_pooling="bilinear", video_newline=True)),
    "blip2, per frame (InstructBLIP-Video)": ("fusion_blip2", dict(video_bridge="per_frame")),
    "blip2, video Q-Former (Video-LLaMA)": ("fusion_blip2", dict(video_bridge="video_qformer")),
    "flamingo, resampler over frames": ("fusion_flamingo", {}),
    "flamingo, 16 latents": ("fusion_flamingo", dict(num_latents=16)),
}


def family_model(family, size, image_size, video: dict | None = None, num_frames: int = 8):
    """One of our models at `image_size`, built from configs on the shared tower and LM (the trade-off study); with
    `video` (the family's video fields), reading clips of up to `num_frames` frames too."""
    from vlm_fusion import FAMILIES
    from vlm_fusion.processing_video import FusionVideoProcessor

    config_cls, model_cls, processor_cls, _ = FAMILIES[family]
    tokenizer = tiny_tokenizer()
    q, f = size["qformer"], size["flamingo"]
    extra = {
        "fusion_llava": {},
        "fusion_blip2": dict(num_query_tokens=q["queries"], qformer_hidden_size=q["hidden"],
                             qformer_num_hidden_layers=q["layers"], qformer_num_attention_heads=q["heads"],
                             qformer_intermediate_size=q["ffn"]),
        "fusion_flamingo": dict(num_latents=f["latents"], perceiver_depth=f["depth"], perceiver_heads=f["heads"],
                                perceiver_head_dim=f["head_dim"], cross_attention_heads=f["heads"],
                                cross_attention_head_dim=f["head_dim"], cross_attention_every_n_layers=f["every_n"],
                                end_of_chunk_token_id=len(tokenizer)),
    }[family]
    image_token_id = len(tokenizer) + (1 if family == "fusion_flamingo" else 0)
    video_kwargs = {}
    if video is not None:
        extra = {**extra, "video_token_id": image_token_id + 1, **video}
        if family == "fusion_flamingo":
            extra.setdefault("max_num_frames", num_frames)
        if family == "fusion_blip2":  # the video Q-Former's queries as many as the image Q-Former's
            extra.setdefault("max_num_frames", max(num_frames, 32))
            extra.setdefault("num_video_query_tokens", q["queries"])
    config = config_cls(vision_config=vision_config(size, image_size), text_config=size["lm"],
                        image_token_id=image_token_id, **extra)
    if video is not None:
        per_frame, per_clip = config.video_token_counts()
        video_kwargs = dict(video_processor=FusionVideoProcessor.from_image_processor(image_processor(image_size),
                                                                                      num_frames=num_frames),
                            video_tokens_per_frame=per_frame, video_tokens_per_clip=per_clip)
    processor = processor_cls(image_processor=image_processor(image_size), tokenizer=tokenizer,
                              image_seq_length=config.num_image_tokens(), **video_kwargs)
    assert processor.image_token_id == image_token_id and processor.video_token_id == config.video_token_id
    return model_cls(config).eval(), processor
