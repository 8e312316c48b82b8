"""Tiny, randomly initialised parts — built offline from configs — for docs, tests and smoke benchmarks.

Widths are multiples of 64 so that the LM's linear layers also quantize to 4-bit on CPU.
"""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

TINY_VISION = {
    "clip": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4},
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4},
    "dinov2": {"model_type": "dinov2", "hidden_size": 64, "mlp_ratio": 2, "num_hidden_layers": 2,
               "num_attention_heads": 4},
    "vit": {"model_type": "vit", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4},
}

TINY_TEXT = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512,
             "tie_word_embeddings": True},
    "opt": {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "word_embed_proj_dim": 64, "max_position_embeddings": 512},
}

# A tiny Q-Former for the BLIP-2-style family (its config defaults are BLIP-2's own: 12 layers, 768 wide).
TINY_QFORMER = {"num_query_tokens": 8, "qformer_hidden_size": 64, "qformer_num_hidden_layers": 2,
                "qformer_num_attention_heads": 4, "qformer_intermediate_size": 128}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = (
    "USER ASSISTANT SYSTEM : ? . , ! a an the is are what which how many colour color shape shapes "
    "there of in on to left right above below circle square triangle star red green blue yellow "
    "white black small large one two three yes no image picture photo shown describe this that"
).split()


def tiny_vision_config(kind: str = "clip", *, image_size: int = 32, patch_size: int = 8) -> dict:
    return {**TINY_VISION[kind], "image_size": image_size, "patch_size": patch_size}


def tiny_text_config(kind: str = "llama", *, vocab_size: int = 128) -> dict:
    config = {**TINY_TEXT[kind], "vocab_size": vocab_size}
    # Special token ids of the tiny tokenizer, so generation pads and stops consistently.
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return config


def tiny_tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (ids: <unk>=0, <s>=1, </s>=2, <pad>=3, then the words)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_bpe_tokenizer(words=WORDS, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `words` in a moment (as GPT-2's and Llama 3's are byte-level BPEs), that
    adds BOS as Llama's does: spaces belong to the next token, newlines are tokens, merges cross word pieces."""
    from tokenizers import decoders, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(words[i:] + words[:i]) + "\n" for i in range(len(words))]
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert_tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with BERT's special tokens and template (`[CLS] text [SEP]`; ids: [PAD]=0,
    [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then the words): the Q-Former's tokenizer, as bert-base-uncased is BLIP-2's."""
    from tokenizers import normalizers, processors

    vocab = {token: i for i, token in enumerate(BERT_SPECIAL_TOKENS + list(dict.fromkeys(w.lower() for w in words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_qformer_retrieval(vision: str = "clip", *, image_size: int = 32, **config_kwargs):
    """A tiny random BLIP-2 stage-1 model (`FusionBlip2ForImageTextRetrieval`) and its processor."""
    from vlm_fusion import FusionBlip2ForImageTextRetrieval, FusionBlip2QFormerConfig, FusionBlip2QFormerProcessor

    processor = FusionBlip2QFormerProcessor(image_processor=tiny_image_processor(image_size),
                                            tokenizer=tiny_bert_tokenizer())
    config = FusionBlip2QFormerConfig(
        vision_config=tiny_vision_config(vision, image_size=image_size), **TINY_QFORMER,
        **{"qformer_vocab_size": len(processor.tokenizer), "qformer_bos_token_id": processor.bos_token_id,
           "embed_dim": 32, **config_kwargs})
    return FusionBlip2ForImageTextRetrieval(config).eval(), processor


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def tiny_model_and_processor(family: str = "fusion_llava", vision: str = "clip", text: str = "llama", *,
                             image_size: int = 32, video: bool = False, num_frames: int = 4, **config_kwargs):
    """A tiny random model of `family` and its processor, the `<image>` token added to the tiny tokenizer; with
    `video=True` the model reads clips too (`<video>` added after `<image>`) and the processor samples `num_frames`."""
    from vlm_fusion import FAMILIES
    from vlm_fusion.processing_video import FusionVideoProcessor

    config_cls, model_cls, processor_cls, _ = FAMILIES[family]
    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    if family == "fusion_flamingo":  # `<image>` is a real LM token: <|endofchunk|> = 58, <image> = 59
        vocab_size += 2
        config_kwargs = {"image_token_id": vocab_size - 1, "end_of_chunk_token_id": vocab_size - 2, **config_kwargs}
        if video:  # `<video>` a real LM token too, 60; a time embedding per frame
            vocab_size += 1
            config_kwargs = {"video_token_id": vocab_size - 1, "max_num_frames": num_frames, **config_kwargs}
    else:  # the placeholder ids `<image>` (and `<video>`) get when the processor adds them, outside the LM vocabulary
        config_kwargs = {"image_token_id": vocab_size, **config_kwargs}
        if video:
            config_kwargs = {"video_token_id": vocab_size + 1, **config_kwargs}
    if family == "fusion_blip2":
        config_kwargs = {**TINY_QFORMER, **config_kwargs}
    config = config_cls(
        vision_config=tiny_vision_config(vision, image_size=image_size),
        text_config=tiny_text_config(text, vocab_size=vocab_size),
        **config_kwargs,
    )
    image_processor = tiny_image_processor(image_size)
    video_kwargs = {}
    if video:
        per_frame, per_clip = config.video_token_counts()
        video_kwargs = dict(video_processor=FusionVideoProcessor.from_image_processor(image_processor,
                                                                                     num_frames=num_frames),
                            video_tokens_per_frame=per_frame, video_tokens_per_clip=per_clip)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer,
                              image_seq_length=config.num_image_tokens(), **video_kwargs)
    assert processor.image_token_id == config.image_token_id
    assert processor.video_token_id == config.video_token_id
    return model_cls(config).eval(), processor


TRAINING_COLOURS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20)}


def write_training_parts(root, text: str = "llama", samples: int = 16):
    """Pretrained parts and data as a user of `vlm-fusion train` has them: a tiny CLIP tower with its image
    processor, a tiny causal LM with a byte-level BPE tokenizer (BOS added, as Llama's), a tiny BERT with a BERT-style
    tokenizer (what BLIP-2's Q-Former starts from), an image folder and two
    LLaVA-format files: image-caption pairs (`captions.json`) and multi-turn conversations (`conversations.json`:
    one, two or no images per sample)."""
    import json
    import pathlib

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForCausalLM, BertForMaskedLM, CLIPVisionModel

    root = pathlib.Path(root)
    torch.manual_seed(0)
    CLIPVisionModel(AutoConfig.for_model(**tiny_vision_config("clip"))).save_pretrained(root / "vision")
    tiny_image_processor().save_pretrained(root / "vision")
    tokenizer = tiny_bpe_tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config(text, vocab_size=len(tokenizer))))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    bert_tokenizer = tiny_bert_tokenizer()  # the Q-Former's start for BLIP-2's stage 1 (bert-base-uncased's stand-in)
    bert = AutoConfig.for_model("bert", vocab_size=len(bert_tokenizer), hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    BertForMaskedLM(bert).save_pretrained(root / "bert")
    bert_tokenizer.save_pretrained(root / "bert")
    (root / "images").mkdir(parents=True)
    names = list(TRAINING_COLOURS)
    for i in range(samples):
        Image.new("RGB", (32, 32), TRAINING_COLOURS[names[i % 4]]).save(root / "images" / f"{i}.png")
    captions = [{"id": f"cap{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": f"a {names[i % 4]} square"}]}
        for i in range(samples)]
    conversations = []
    for i in range(samples):
        colour, other = names[i % 4], names[(i + 1) % 4]
        if i % 4 == 3:  # text only
            conversations.append({"id": f"txt{i}", "conversations": [
                {"from": "human", "value": "what colour is the sky ?"}, {"from": "gpt", "value": "blue"}]})
        elif i % 4 == 2:  # two images
            conversations.append({"id": f"two{i}", "image": [f"{i}.png", f"{(i + 1) % samples}.png"],
                                  "conversations": [
                {"from": "human", "value": "<image>\n<image>\nwhat colours are these ?"},
                {"from": "gpt", "value": f"{colour} and {other}"}]})
        else:
            conversations.append({"id": f"conv{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it ?"}, {"from": "gpt", "value": colour},
                {"from": "human", "value": "is it a square ?"}, {"from": "gpt", "value": "yes"}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "conversations.json").write_text(json.dumps(conversations))
    return root


def write_training_clips(root, samples: int = 8, frames: int = 6):
    """Clips beside `write_training_parts`' images (in `root/images/clips/`), as video data has them: even samples a
    video file (MPEG-4, written with PyAV), odd ones a frames folder of numbered PNGs; each clip a square that moves
    right across a colour's background. `videos.json` (LLaVA-Video's layout: `"video"`, `<video>` in the human turn)
    asks which way it moves; `mixed.json` is those samples and `conversations.json`'s, alternating (images, clips and
    text-only samples in one data set). Returns `root`."""
    import json
    import pathlib

    import av
    import numpy as np
    from PIL import Image

    root = pathlib.Path(root)
    folder = root / "images" / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    names = list(TRAINING_COLOURS)
    rows = []
    for i in range(samples):
        clip = np.zeros((frames, 32, 32, 3), dtype=np.uint8)
        clip[:] = TRAINING_COLOURS[names[i % 4]]
        for f in range(frames):  # a white square, one step right a frame
            clip[f, 12:20, 2 + 4 * f:10 + 4 * f] = 255
        if i % 2:
            path = f"clips/{i:04d}/"
            (folder / f"{i:04d}").mkdir(exist_ok=True)
            for f, frame in enumerate(clip):
                Image.fromarray(frame).save(folder / f"{i:04d}" / f"frame_{f}.png")
        else:
            path = f"clips/{i:04d}.mp4"
            with av.open(str(root / "images" / path), "w") as container:
                stream = container.add_stream("mpeg4", rate=4)
                stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
                for frame in clip:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
        rows.append({"id": f"clip{i}", "video": path, "conversations": [
            {"from": "human", "value": "<video>\nwhich way does the square move ?"},
            {"from": "gpt", "value": f"right , on {names[i % 4]}"}]})
    (root / "videos.json").write_text(json.dumps(rows))
    images = json.loads((root / "conversations.json").read_text())
    mixed = [row for pair in zip(rows, images) for row in pair]
    (root / "mixed.json").write_text(json.dumps(mixed))
    return root
