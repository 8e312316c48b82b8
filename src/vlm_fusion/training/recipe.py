"""`vlm-fusion train`: one stage of the recipe, from a vlm-fusion checkpoint or from pretrained parts, to a
vlm-fusion checkpoint with its processor and a model card that records the training.

    the processor (from configs: no weight read)  ->  the data pass: read + check + encode every sample once, into
    the on-disk cache every process reads (cache.py)  ->  load the model (or compose it from a tower and an LM)  ->
    freeze what the stage keeps (LoRA / QLoRA on the LM if asked)  ->  transformers' Trainer  ->  save

Image-caption pairs streamed from WebDataset shards (`align`, `qformer`) take `streaming.py`'s path instead.

Run it in one process (`vlm-fusion train ...`) or in several through accelerate's launcher
(`vlm-fusion train --accelerate ddp|fsdp2|zero2|zero3 --num-processes N ...`, or `accelerate launch -m
vlm_fusion.training ...` with a config of your own).
"""

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field

import torch
from transformers.utils import logging

from . import data
from .distributed import training_arguments
from .stages import LORA, STAGES, TOWER_LR
from .watch import LOSS_CURVE, plot_losses, report_to

logger = logging.get_logger("vlm_fusion.training")
FAMILY_TYPES = {"llava": "fusion_llava", "blip2": "fusion_blip2", "flamingo": "fusion_flamingo"}


@dataclass
class TrainOptions:
    """Everything one stage takes; the CLI's flags have the same names."""

    data: str  # LLaVA JSON / JSON lines, or a local TRL-format dataset
    output_dir: str
    stage: str = "instruct"  # align | instruct | flamingo | qformer
    image_folder: str | None = None
    model: str | None = None  # a vlm-fusion checkpoint to start from ...
    family: str | None = None  # ... or parts: llava | blip2 | flamingo
    vision_tower: str | None = None
    language_model: str | None = None
    qformer_init: str | None = None  # --stage qformer: a BERT checkpoint the Q-Former starts from (BLIP-2's)
    qformer_tokenizer: str | None = None  # --stage qformer from scratch: the Q-Former's tokenizer
    bridge: dict = field(default_factory=dict)  # the family's config fields (projector_type, num_query_tokens, ...)
    layout: str | None = None  # plain | chat (default: the stage's)
    chat_template: str | None = None  # a Jinja chat template, or a file holding one (default: the processor's)
    plain_end: str | None = None  # what ends a plain sample (default "\n"; Flamingo's <|endofchunk|>)
    max_length: int = 2048
    skip_too_long: bool = False  # skip longer samples (with a count) instead of refusing the data
    streaming: bool = False  # stream image-caption pairs (training/streaming.py); WebDataset shards always are
    bridge_lr: float | None = None
    lm_lr: float | None = None
    train_tower: bool = False
    tower_lr: float = TOWER_LR
    lora: bool = False
    qlora: bool = False
    lora_r: int = LORA["r"]
    lora_alpha: int = LORA["lora_alpha"]
    batch_size: int = 8  # per process
    gradient_accumulation: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    warmup: float | None = None  # a fraction of the steps (< 1) or a number of steps (default: the stage's 0.03)
    weight_decay: float | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    logging_steps: int | None = None  # default: scaled to the run (trainer.logging_interval)
    save_steps: int = 500
    seed: int = 0
    workers: int = 0
    eval_data: str | None = None  # held-out samples (the formats of `data`): their loss every `eval_steps`
    eval_steps: int | None = None  # default: `save_steps`
    data_cache: str | None = None  # the data pass's cache folder (default: $VLM_FUSION_DATA_CACHE or ~/.cache/...)
    data_workers: int | None = None  # processes of the data pass (default: one per core; 0: in this process)
    clear_data_cache: bool = False  # remove the data cache's folders this run does not use
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"  # tensorboard | wandb | none: transformers' integration the logs also go to


# ---- the output folder ------------------------------------------------------------------------------------------
def prepare_output(options: TrainOptions):
    """The last checkpoint to resume from, or `None`; refuses a folder in use unless told what to do with it (an
    `--overwrite`n folder is emptied by `clear_output`, once the data have passed their checks)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = options.output_dir
    if os.path.isfile(out):
        raise data.DataError(f"--output-dir {out} is a file")
    used = os.path.isdir(out) and os.listdir(out)
    if options.resume:
        last = get_last_checkpoint(out) if used else None
        if last is None:
            raise data.DataError(f"--resume: {out} holds no checkpoint-* folder to resume from")
        return last
    if used and not options.overwrite:
        raise data.DataError(f"--output-dir {out} is not empty: pass --resume to continue its run, or --overwrite to "
                             "start again")
    return None


def clear_output(options: TrainOptions) -> None:
    if options.overwrite and not options.resume and os.path.isdir(options.output_dir) and is_main_process():
        shutil.rmtree(options.output_dir)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- model and processor -----------------------------------------------------------------------------------------
def quantization(options):
    if not options.qlora:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16 if options.bf16 else torch.float32)


def load_model(options: TrainOptions, quantize: bool = True, weights: bool = True):
    """The model and processor to train: a vlm-fusion checkpoint, or a new model composed from a tower and an LM;
    `chat_template` replaces the processor's (and is saved with it). `weights=False`: the processor alone (and
    `None`), from configs and tokenizers."""
    model, processor = load_model_and_processor(options, quantize, weights)
    if options.chat_template:
        template = options.chat_template
        if os.path.isfile(template):
            with open(template, encoding="utf-8") as f:
                template = f.read()
        processor.chat_template = template
    return model, processor


def load_model_and_processor(options: TrainOptions, quantize: bool, weights: bool = True):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_fusion

    bnb = quantization(options) if quantize else None
    stage1 = bool(options.model) and is_qformer_checkpoint(options.model)
    if stage1 and not options.language_model:
        raise data.DataError(f"{options.model} is a stage-1 Q-Former checkpoint (no LM): give --language-model LM to "
                             "build BLIP-2's generation model from it (its generative stage: --stage align)")
    if options.model and options.language_model and not stage1:
        raise data.DataError(f"--model with --language-model starts BLIP-2's generative stage from a stage-1 Q-Former "
                             f"checkpoint (vlm-fusion train --stage qformer), and {options.model} is not one; a "
                             "vlm-fusion generation checkpoint already has its LM: drop --language-model")
    if stage1:
        if options.family not in (None, "blip2") or options.vision_tower:
            raise data.DataError("a stage-1 Q-Former checkpoint brings its vision tower and is BLIP-2-style: drop "
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
            raise data.DataError("give either --model (a vlm-fusion checkpoint) or --family, --vision-tower and "
                                 "--language-model (parts), not both")
        if not weights:
            return None, AutoProcessor.from_pretrained(options.model)
        kwargs = {"quantization_config": bnb} if bnb else {}
        model = AutoModelForImageTextToText.from_pretrained(options.model, **kwargs)
        if not hasattr(model, "parameter_parts"):
            raise data.DataError(f"{options.model} holds a {type(model).__name__}, not a vlm-fusion model")
        return model, AutoProcessor.from_pretrained(options.model)
    missing = [flag for flag, value in (("--family", options.family), ("--vision-tower", options.vision_tower),
                                        ("--language-model", options.language_model)) if not value]
    if missing:
        raise data.DataError(f"start from --model DIR, or from parts: missing {', '.join(missing)}")
    family = vlm_fusion.FAMILIES[FAMILY_TYPES[options.family]]
    if not weights:
        config = family.model.config_from_vision_text_pretrained(options.vision_tower, options.language_model,
                                                                 **options.bridge)
        return None, family.processor.from_vision_text_pretrained(options.vision_tower, options.language_model, config)
    text_kwargs = {"quantization_config": bnb} if bnb else {}
    model = family.model.from_vision_text_pretrained(options.vision_tower, options.language_model,
                                                     text_kwargs=text_kwargs, **options.bridge)
    processor = family.processor.from_vision_text_pretrained(options.vision_tower, options.language_model, model.config)
    return model, processor


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
    return trainable_per_part(model)


def trainable_per_part(model) -> dict[str, int]:
    from .trainer import unwrap

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


# ---- data ----------------------------------------------------------------------------------------------------------
def data_processor(options):
    """The processor the data are encoded with, composed from the checkpoints' configs and tokenizers: no weight is
    read before the data pass."""
    _, processor = load_model(options, weights=False)
    return processor


def plain_end(options, processor) -> str:
    if options.plain_end is not None:
        return options.plain_end
    return getattr(processor, "end_of_chunk_token", None) or "\n"  # LLaVA's separator; Flamingo's <|endofchunk|>


def prepare_data(options, processor, layout: str, path: str, flag: str = "--data"):
    """The data pass (`cache.prepare`: every sample read, checked and encoded once, then cached) and the samples within
    `--max-length`: longer ones are refused (or skipped, with a count), never cut. Returns `(prepared, indices,
    skipped)`."""
    import numpy as np

    from .cache import prepare

    try:
        prepared = prepare(path, options.image_folder, processor, layout, plain_end(options, processor),
                           root=options.data_cache, workers=options.data_workers, show_progress=is_main_process())
    except data.DataError as error:
        raise data.DataError(f"{flag}: {error}" if flag != "--data" else str(error)) from None
    lengths = prepared.dataset.data.column("length").to_numpy()
    keep = np.flatnonzero(lengths <= options.max_length)
    skipped = len(lengths) - len(keep)
    if skipped:
        over = np.flatnonzero(lengths > options.max_length)[:3]
        first = ", ".join(f"{prepared.dataset[int(i)]['id']} ({lengths[i]})" for i in over)
        message = (f"{flag}: " if flag != "--data" else "") + (
            f"{skipped} of {len(lengths)} samples are longer than --max-length {options.max_length} tokens "
            f"(e.g. {first}); a sample is never cut (an image's placeholders would break)")
        if not options.skip_too_long:
            raise data.DataError(message + ": raise --max-length, or pass --skip-too-long")
        logger.warning("%s: skipped.", message)
        if not len(keep):
            raise data.DataError(message + ", and no sample is left")
    return prepared, keep, skipped


def clear_data_cache(options, used: list[str]) -> None:
    """`--clear-data-cache`: the main process removes the cache's folders but `used` (this run's data passes)."""
    if not options.clear_data_cache or not is_main_process():
        return
    from .cache import clear, default_root, human_size

    root = options.data_cache or default_root()
    removed, freed = clear(root, keep=used)
    logger.warning("data cache: removed %d data pass(es) this run does not use from %s, %s", removed, root,
                   human_size(freed))


# ---- the stage -------------------------------------------------------------------------------------------------
def train(options: TrainOptions) -> dict:
    """Run one stage; returns a summary (stage, data, samples, steps, final loss, where the model is)."""
    from .trainer import ConversationDataset, FusionTrainer

    if options.stage not in STAGES:
        raise data.DataError(f"--stage must be one of {', '.join(STAGES)}, got {options.stage!r}")
    report_to(options.report_to)  # its package missing: one line, before anything loads
    if options.stage == "qformer":
        from . import qformer

        return qformer.train(options)
    stage = STAGES[options.stage]
    layout = options.layout or stage.layout
    if options.lora and options.qlora:
        raise data.DataError("--lora and --qlora: choose one")
    if (options.lora or options.qlora) and not stage.trains_language_model:
        raise data.DataError(f"--lora / --qlora adapt the LM, which the {stage.name} stage keeps frozen")
    resume_from = prepare_output(options)
    from . import streaming

    if streaming.wanted(options):  # image-caption pairs streamed from shards or a `datasets` dataset
        return streaming.train_align(options, stage, layout, resume_from)
    processor = data_processor(options)
    prepared, kept, too_long = prepare_data(options, processor, layout, options.data)
    evaluation = prepare_data(options, processor, layout, options.eval_data, "--eval-data") if options.eval_data \
        else None
    clear_data_cache(options, [prepared.folder] + ([evaluation[0].folder] if evaluation else []))
    torch.manual_seed(options.seed)
    model, processor = load_model(options)

    counts = freeze_for(model, stage, options)
    if options.lora or options.qlora:
        model = add_lora(model, options)
        counts = trainable_per_part(model)
    logger.warning("trainable parameters per part: %s", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    part_lrs = part_learning_rates(options, stage)
    collator = batch_collator(model, processor)
    arguments = stage_arguments(options, stage, part_lrs["bridge"], include_num_input_tokens_seen="non_padding",
                                train_sampling_strategy="group_by_length" if options.group_by_length else "random",
                                **evaluation_arguments(options))
    summary = {"stage": stage.name, "layout": layout, "data": prepared.name, "samples": len(kept),
               "samples_skipped": too_long, "data_cache": {"folder": prepared.folder, "built": prepared.built}}
    if evaluation is not None:
        summary["eval_data"] = {"data": evaluation[0].name, "samples": len(evaluation[1]),
                                "samples_skipped": evaluation[2]}
    return run_stage(FusionTrainer, model, processor, options, arguments, ConversationDataset(processor, prepared, kept),
                     collator, part_lrs, counts, resume_from, summary,
                     eval_dataset=ConversationDataset(processor, *evaluation[:2]) if evaluation else None)


def part_learning_rates(options, stage) -> dict[str, float]:
    """Each part's learning rate: the options', else the stage's (LoRA's rate for the LM's adapters)."""
    adapters = options.lora or options.qlora
    part_lrs = {"bridge": options.bridge_lr if options.bridge_lr is not None else stage.bridge_lr,
                "language_model": options.lm_lr if options.lm_lr is not None else (
                    stage.lora_lr if adapters else stage.lm_lr),
                "vision_tower": options.tower_lr}
    if stage.trains_input_embeddings:
        part_lrs["input_embeddings"] = part_lrs["language_model"]
    return part_lrs


def batch_collator(model, processor):
    """The collator of the generation families: the tokenizer's padding id (else EOS), the model's per-image inputs."""
    from .trainer import Collator

    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return Collator(pad, inner.model_class._per_image_inputs, getattr(inner.config, "qformer_pad_token_id", 0))


def evaluation_arguments(options) -> dict:
    """The held-out loss on `--eval-data` every `--eval-steps` (default: at each checkpoint, `--save-steps`)."""
    if not options.eval_data:
        return {}
    return {"eval_strategy": "steps", "eval_steps": options.eval_steps or options.save_steps,
            "per_device_eval_batch_size": options.batch_size, "prediction_loss_only": True}


def stage_arguments(options: TrainOptions, stage, learning_rate: float, **extra):
    """`TrainingArguments` of a stage: the options, the stage's defaults, this machine and launch; `extra` on top."""
    from transformers import TrainingArguments

    from .trainer import LOG_EVERY

    schedule = {"lr_scheduler_type": "cosine"} if not stage.min_lr_rate else {
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": stage.min_lr_rate}}
    return TrainingArguments(
        **training_arguments(),  # the CPU, and the engine accelerate was launched with
        output_dir=options.output_dir, per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation, num_train_epochs=options.epochs,
        max_steps=options.max_steps, learning_rate=learning_rate, **schedule,
        warmup_steps=stage.warmup if options.warmup is None else options.warmup,
        weight_decay=stage.weight_decay if options.weight_decay is None else options.weight_decay,
        bf16=options.bf16, **checkpointing_arguments(options.gradient_checkpointing),
        logging_steps=options.logging_steps or LOG_EVERY, dataloader_pin_memory=torch.cuda.is_available(),
        save_strategy="steps", save_steps=options.save_steps, save_total_limit=1, seed=options.seed,
        data_seed=options.seed, report_to=report_to(options.report_to), remove_unused_columns=False,
        dataloader_num_workers=options.workers,
        # an unused tower layer (features from layer -2) would trip DDP when the tower trains
        ddp_find_unused_parameters=options.train_tower, **extra,
    )


def run_stage(trainer_class, model, processor, options, arguments, dataset, collator, part_lrs, counts, resume_from,
              summary: dict, eval_dataset=None) -> dict:
    """Train (stopping cleanly on SIGTERM), then save the model, its processor and a card; returns the summary. A run
    resumed from its last step trains no step: it saves the checkpoint's weights, with its steps and losses."""
    from .trainer import (EndAtTheLastStep, LogTheLastStep, NothingLeftToTrain, StopOnSignal, final_loss,
                          logging_interval)

    clear_output(options)
    if "data_cache" not in summary:  # Q-Former pairs and streamed data: no data pass of the cache's
        clear_data_cache(options, [])
    if options.logging_steps is None:
        arguments.logging_steps = logging_interval(arguments, dataset)
    stopper = StopOnSignal()
    try:  # the SIGTERM handler is restored whatever fails, building the trainer included
        trainer = trainer_class(model=model, args=arguments, train_dataset=dataset, eval_dataset=eval_dataset,
                                data_collator=collator, part_lrs=part_lrs,
                                callbacks=[stopper, LogTheLastStep(), EndAtTheLastStep()])
        trainer.train(resume_from_checkpoint=resume_from)
    except NothingLeftToTrain:
        logger.warning("%s is the run's last step (%d): nothing left to train, saving its model", resume_from,
                       trainer.state.global_step)
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)  # reporters, progress bar
    finally:
        stopper.restore()
    summary = {**summary, "steps": trainer.state.global_step, "final_loss": final_loss(trainer.state.log_history),
               "trainable_parameters": counts, "learning_rates": part_lrs, "output_dir": options.output_dir,
               "options": {k: v for k, v in asdict(options).items() if k not in ("output_dir",)}}
    if stopper.stopped_at is not None:
        summary["stopped_at"] = stopper.stopped_at
        return summary
    save(trainer, model, processor, options, summary)
    return summary


def checkpointing_arguments(enabled: bool) -> dict:
    """Non-reentrant activation checkpointing, under the name this transformers gives it (5.24 renamed
    `gradient_checkpointing` to `activation_checkpointing`)."""
    import dataclasses

    from transformers import TrainingArguments

    name = "activation_checkpointing" if any(f.name == "activation_checkpointing"
                                             for f in dataclasses.fields(TrainingArguments)) else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}} if enabled else {}


def save(trainer, model, processor, options, summary):
    """The stage's output: the model (LoRA merged into the LM), its processor, and a card recording the training."""
    out = options.output_dir
    if options.lora or options.qlora:
        model = merged(trainer, model, options)  # `None` but on the main process
        if model is not None:
            model.save_pretrained(out)
    else:
        trainer.save_model(out)
    if not trainer.is_world_process_zero():
        return
    from vlm_fusion.tools.hub import write_model_card

    from .trainer import unwrap

    processor.save_pretrained(out)
    summary["loss_curve"] = LOSS_CURVE if plot_losses(trainer.state.log_history, os.path.join(out, LOSS_CURVE)) \
        else None
    with open(os.path.join(out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    write_model_card(unwrap(model), out, extra=training_section(summary))


def merged(trainer, model, options):
    """The adapters (saved in `adapter/`) and the trained bridge on the base model in full precision, merged; the full
    state dict is gathered from every process (FSDP, ZeRO-3), and the merge happens on the main one."""
    from peft import PeftModel

    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    adapter = os.path.join(options.output_dir, "adapter")
    model.save_pretrained(adapter, state_dict=state)
    trained = {name.removeprefix("base_model.model."): state[name] for name, p in model.named_parameters()
               if p.requires_grad and "lora_" not in name}
    base, _ = load_model(options, quantize=False)
    parameters = dict(base.named_parameters())
    missing = [name for name in trained if name not in parameters]
    if missing:
        raise RuntimeError(f"trained parameters not found in the base model: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in trained.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    with peft_quietly():
        return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def training_section(summary: dict) -> str:
    o = summary["options"]
    steps = f"{summary['steps']} steps" + (f" ({o['epochs']:g} epochs)" if o["max_steps"] < 0 else "")
    adapters = " with LoRA on the LM (merged)" if o["lora"] else " with QLoRA on the LM (merged)" if o["qlora"] else ""
    rows = [("stage", f"`{summary['stage']}` ({summary['layout']} layout){adapters}"),
            ("data", f"`{summary['data']}`, {summary['samples']:,} samples"
                     + (f" ({summary['samples_skipped']} longer than {o['max_length']} tokens skipped)"
                        if summary["samples_skipped"] else "")),
            ("trainable parameters", ", ".join(f"{k} {v:,}" for k, v in summary["trainable_parameters"].items())),
            ("learning rates", ", ".join(f"{k} {v:g}" for k, v in summary["learning_rates"].items()
                                         if summary["trainable_parameters"].get(k) or k == "input_embeddings"
                                         or (k == "language_model" and summary["trainable_parameters"].get(
                                             "lora_adapters")))),
            ("batch", f"{o['batch_size']} per process x {o['gradient_accumulation']} accumulation"),
            ("schedule", f"{steps}, cosine, warm-up {o['warmup'] if o['warmup'] is not None else STAGES[summary['stage']].warmup:g}"),
            ("final loss", f"{summary['final_loss']:.4f}" if summary["final_loss"] is not None else "n/a")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    curve = f"\n![training loss]({summary['loss_curve']})\n" if summary.get("loss_curve") else ""
    return f"## Training\n\nTrained with `vlm-fusion train`:\n\n| | |\n|---|---|\n{table}\n{curve}"
