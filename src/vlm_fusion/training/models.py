"""The model a stage of the generation families trains, and its processor: a vlm-fusion checkpoint, BLIP-2's stage-1
Q-Former with an LM (its generative stage), or a new model composed from a vision tower and an LM; then what the stage
keeps frozen, frozen (LoRA / QLoRA on the LM if asked).
"""

import contextlib
import json
import os
import tempfile
import warnings

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
from transformers.utils import logging

import vlm_fusion

from vlm_fusion.special_tokens import add_special_token

from .data import DataError
from .options import TrainOptions
from .stages import LORA

logger = logging.get_logger("vlm_fusion.training")


def quantization(options):
    if not options.qlora:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16 if options.bf16 else torch.float32)


def load_generation_model(options: TrainOptions, quantize: bool = True, weights: bool = True):
    """The model and processor to train: a vlm-fusion checkpoint, or a new model composed from a tower and an LM;
    `chat_template` replaces the processor's (and is saved with it). `weights=False`: the processor alone (and
    `None`), from configs and tokenizers."""
    model, processor = generation_model_and_processor(options, quantize, weights)
    if options.chat_template:
        template = options.chat_template
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                template = f.read()
        processor.chat_template = template
    check_template_renders_clips(processor, options)
    return model, processor


def check_template_renders_clips(processor, options: TrainOptions):
    """A model that reads clips, whose chat template renders an image part but drops a video part, is refused: the
    training data would still mark its clips (they are read as text), but a chat at inference would lose them
    silently. An image checkpoint's template written before it read clips is the usual case."""
    template = processor.chat_template
    if not template or getattr(processor, "video_processor", None) is None:
        return

    def rendered(kind):
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "?"}]}]
        return processor.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)

    if processor.image_token in rendered("image") and processor.video_token not in rendered("video"):
        source = "--chat-template" if options.chat_template else \
            f"the chat template of {options.model or 'the processor'}"
        raise DataError(f"{source} renders an image part as {processor.image_token} but drops a video part "
                        f"({{\"type\": \"video\"}}): give --chat-template with one that renders it as "
                        f"{processor.video_token}, or a chat would read no clip")


def generation_model_and_processor(options: TrainOptions, quantize: bool, weights: bool = True):
    bnb = quantization(options) if quantize else None
    stage1 = bool(options.model) and is_qformer_checkpoint(options.model)
    if stage1 and not options.language_model:
        raise DataError(f"{options.model} is a stage-1 Q-Former checkpoint (no LM): give --language-model LM to "
                        "build BLIP-2's generation model from it (its generative stage: --stage align)")
    if options.model and options.language_model and not stage1:
        raise DataError(f"--model with --language-model starts BLIP-2's generative stage from a stage-1 Q-Former "
                        f"checkpoint (vlm-fusion train --stage qformer), and {options.model} is not one; a "
                        "vlm-fusion generation checkpoint already has its LM: drop --language-model")
    if stage1:
        if options.family not in (None, "blip2") or options.vision_tower:
            raise DataError("a stage-1 Q-Former checkpoint brings its vision tower and is BLIP-2-style: drop "
                            "--vision-tower (and --family)")
        blip2 = vlm_fusion.FusionBlip2ForConditionalGeneration
        model = blip2.from_qformer_pretrained(
            options.model, options.language_model, text_kwargs={"quantization_config": bnb} if bnb else None,
            **options.bridge) if weights else None
        config = model.config if weights else blip2.config_from_qformer_pretrained(options.model,
                                                                                   options.language_model,
                                                                                   **options.bridge)
        processor_class = vlm_fusion.FusionInstructBlipProcessor if config.qformer_text_input \
            else vlm_fusion.FusionBlip2Processor
        extra = {"qformer_tokenizer": AutoProcessor.from_pretrained(options.model).tokenizer} \
            if config.qformer_text_input else {}
        processor = processor_class.from_vision_text_pretrained(options.model, options.language_model, config, **extra)
        return model, processor
    if options.model:
        if options.family or options.vision_tower or options.language_model:
            raise DataError("give either --model (a vlm-fusion checkpoint) or --family, --vision-tower and "
                            "--language-model (parts), not both")
        processor = AutoProcessor.from_pretrained(options.model)
        config = AutoConfig.from_pretrained(options.model)
        added = options.num_frames is not None and getattr(processor, "video_processor", None) is None
        if options.bridge and not added:
            raise DataError(f"--bridge sets the fields of a model composed from parts, or of the video path added to "
                            f"an image checkpoint with --num-frames; {options.model} is trained as it is: drop "
                            f"--bridge ({', '.join(options.bridge)})")
        if added:
            processor, config = with_video_path(processor, config, options)
        processor = with_num_frames(processor, config, options)
        if not weights:
            return None, processor
        if added:  # said once, when the model is loaded (the data pass reads the processor alone first)
            logger.warning(f"--num-frames: {options.model} reads images only; its video path is added (`<video>` id "
                           f"{config.video_token_id}, {config.num_video_tokens(options.num_frames)} LM tokens a clip "
                           f"of {options.num_frames} frames)")
        kwargs = {"quantization_config": bnb} if bnb else {}
        model = AutoModelForImageTextToText.from_pretrained(options.model, config=config, **kwargs)
        if not hasattr(model, "parameter_parts"):
            raise DataError(f"{options.model} holds a {type(model).__name__}, not a vlm-fusion model")
        if added:
            model.embed_marker_tokens()  # the Flamingo-style LM reads its new `<video>` marker
        return model, processor
    missing = [flag for flag, value in (("--family", options.family), ("--vision-tower", options.vision_tower),
                                        ("--language-model", options.language_model)) if not value]
    if missing:
        raise DataError(f"start from --model DIR, or from parts: missing {', '.join(missing)}")
    family = vlm_fusion.family_named(options.family)
    video = options.num_frames is not None  # a model that reads clips too
    bridge = dict(options.bridge)
    if video and family.config.model_type == "fusion_flamingo":  # a time embedding per frame
        bridge.setdefault("max_num_frames", options.num_frames)
    frames = {"num_frames": options.num_frames} if video else {}
    if not weights:
        config = family.model.config_from_vision_text_pretrained(options.vision_tower, options.language_model,
                                                                 video=video, **bridge)
        return None, family.processor.from_vision_text_pretrained(options.vision_tower, options.language_model, config,
                                                                  **frames)
    text_kwargs = {"quantization_config": bnb} if bnb else {}
    model = family.model.from_vision_text_pretrained(options.vision_tower, options.language_model,
                                                     text_kwargs=text_kwargs, video=video, **bridge)
    processor = family.processor.from_vision_text_pretrained(options.vision_tower, options.language_model, model.config,
                                                             **frames)
    return model, processor


def with_video_path(processor, config, options: TrainOptions):
    """An image checkpoint given `--num-frames`: the processor and config of the same model reading clips too, as
    LLaVA-NeXT-Video starts from LLaVA-NeXT. `<video>` is added to the tokenizer; the bridge reads each frame as it
    reads an image, with the video fields of `--bridge` (pooling, the video Q-Former) if given; weights the image
    model has not (a Flamingo-style resampler's time embeddings, a video Q-Former) start new and the stage trains
    them. The video processor samples frames and processes each with the image processor."""
    from vlm_fusion.processing_video import FusionVideoProcessor

    video = {"video_token_id": add_special_token(processor.tokenizer, "<video>")}
    if config.model_type == "fusion_flamingo":
        video["max_num_frames"] = options.num_frames
    # `--bridge` sets the video path's fields here (video_pooling=average, video_bridge=video_qformer, ...)
    config = type(config).from_dict({**config.to_dict(), **video, **options.bridge})
    per_frame, per_clip = config.video_token_counts()
    with tempfile.TemporaryDirectory() as folder:  # the processor rebuilt with its video processor, all else as saved
        processor.save_pretrained(folder)
        processor = AutoProcessor.from_pretrained(
            folder, video_processor=FusionVideoProcessor.from_image_processor(processor.image_processor,
                                                                              num_frames=options.num_frames),
            video_tokens_per_frame=per_frame, video_tokens_per_clip=per_clip)
    for key in ("video_tokens_per_frame", "video_tokens_per_clip"):  # the processor's, handed to the tokenizer too
        processor.tokenizer.init_kwargs.pop(key, None)
    return processor, config


def with_num_frames(processor, config, options: TrainOptions):
    """A checkpoint's processor, sampling `--num-frames` frames a clip if given (the checkpoint reads clips)."""
    if options.num_frames is None:
        return processor
    limit = config.max_num_frames if config.model_type == "fusion_flamingo" or \
        getattr(config, "video_bridge", None) == "video_qformer" else None  # a frame embedding per frame
    if limit is not None and options.num_frames > limit:
        raise DataError(f"--num-frames {options.num_frames}: {options.model} embeds at most {limit} frames a clip "
                        "(its config's max_num_frames)")
    processor.video_processor.num_frames = options.num_frames
    processor.video_processor.fps = None
    return processor


def is_qformer_checkpoint(path: str) -> bool:
    """Whether `path` holds BLIP-2's stage 1 (`fusion_blip2_qformer`), read off its config."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "fusion_blip2_qformer"


def freeze_for(model, stage, options) -> dict[str, int]:
    """What the stage trains, as a count of trainable parameters per part."""
    model.requires_grad_(False)
    parts = model.parameter_parts()
    trains = {"bridge": True, "language_model": stage.trains_language_model and not (options.lora or options.qlora),
              "vision_tower": options.train_tower}
    for part, on in trains.items():
        for parameter in parts[part].values():
            parameter.requires_grad_(on)
    if stage.trains_input_embeddings:
        model.get_input_embeddings().requires_grad_(True)
    if options.train_output_embeddings:  # at the LM's rate (tied to the input embeddings: the same weight)
        model.get_output_embeddings().requires_grad_(True)
    return trainable_per_part(model)


def trainable_per_part(model) -> dict[str, int]:
    inner = unwrap(model)
    counts = {part: sum(p.numel() for p in params.values() if p.requires_grad)
              for part, params in inner.parameter_parts().items()}
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    if lora:
        counts["lora_adapters"] = lora
        counts["language_model"] -= lora
    return counts


@contextlib.contextmanager
def peft_quietly():
    """PEFT (0.21 too) reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecated with a
    FutureWarning on every read: a notice to PEFT, of nothing a user can act on, printed by every process at every
    LoRA run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, options):
    """LoRA adapters on every linear layer of the LM's decoder (not on the bridge's blocks inside it)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    trained = [p for p in model.parameters() if p.requires_grad]
    if options.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = [name for name, module in model.model.language_model.named_modules()
               if isinstance(module, torch.nn.Linear) and "gated_cross_attn_layer" not in name]
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=LORA["lora_dropout"],
                        target_modules=[f"model.language_model.{name}" for name in targets], bias="none")
    with peft_quietly():
        model = get_peft_model(model, config)
    for parameter in trained:  # get_peft_model freezes everything but the adapters: the bridge trains fully
        parameter.requires_grad_(True)
    return model


def model_to_train(options: TrainOptions, stage, load=load_generation_model):
    """`load(options)`'s model and processor, the seed set first (a new bridge starts the same in every process and
    run), frozen but for what `stage` trains (LoRA adapters on the LM if asked); and the count of trainable parameters
    per part."""
    torch.manual_seed(options.seed)
    model, processor = load(options)
    trainable = freeze_for(model, stage, options)
    if options.lora or options.qlora:
        model = add_lora(model, options)
        trainable = trainable_per_part(model)
    return model, processor, trainable


def load_processor(options: TrainOptions):
    """The processor the data are encoded with, composed from the checkpoints' configs and tokenizers: no weight is
    read before the data pass."""
    _, processor = load_generation_model(options, weights=False)
    return processor


def unwrap(model):
    """The vlm-fusion model inside a PEFT wrapper (or the model itself)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "parameter_parts") else model
