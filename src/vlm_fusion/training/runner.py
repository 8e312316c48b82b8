"""The runner: any stage's run, described (`Run`), trained on transformers' Trainer and saved.

    Run (model, processor, dataset, collator, learning rates, arguments)  ->  TrainingArguments  ->  Trainer (stopping
    cleanly on SIGTERM; a resume from the last step trains no step more)  ->  the model (LoRA merged), its processor,
    training_summary.json, loss.png and a model card recording the training

Each stage's function (`generation.py`, `qformer.py`) checks its options and the output folder (`prepare_output`, before
any data is read) and builds a `Run`; `recipe.train` hands it here. Nothing here knows which stage it runs beyond the
`Stage` row it is given.
"""

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from vlm_fusion.model_card import write_model_card

from .conversations import clear_data_cache
from .data import DataError
from .distributed import is_main_process, machine_arguments
from .models import peft_quietly, unwrap
from .options import TrainOptions
from .stages import STAGES, Stage
from .trainer import (LOG_EVERY, EndAtTheLastStep, FusionTrainer, LogTheLastStep, NothingLeftToTrain, StopOnSignal,
                      final_loss, logging_interval)
from .watch import LOSS_CURVE, plot_losses, report_to

logger = logging.get_logger("vlm_fusion.training")


@dataclass
class Run:
    """One stage's run, described: what trains, on what, at which rates; the runner does the rest."""

    options: TrainOptions  # as the run reads them (a streamed run's --epochs turned into --max-steps)
    stage: Stage
    layout: str
    model: object  # the model to train, frozen but for what the stage trains (a PEFT model with LoRA)
    processor: object  # saved with the model
    trainable: dict[str, int]  # trainable parameters per part
    part_lrs: dict[str, float]  # each part's learning rate (`FusionTrainer`)
    dataset: object
    collator: object
    summary: dict  # what the stage reports of its data (name, samples, ...)
    arguments: dict = field(default_factory=dict)  # `TrainingArguments` fields of this stage, beyond the common ones
    resume_from: str | None = None  # the checkpoint the run continues from (`prepare_output`)
    trainer_class: type = FusionTrainer
    eval_dataset: object = None
    data_cache: list[str] = field(default_factory=list)  # the data pass folders this run reads (kept by
    # --clear-data-cache)
    base_model: Callable | None = None  # LoRA: the model in full precision the adapters merge into, when saved


# ---- the output folder ------------------------------------------------------------------------------------------
def prepare_output(options: TrainOptions):
    """The last checkpoint to resume from, or `None`; refuses a folder in use unless told what to do with it (an
    `--overwrite`n folder is emptied by `clear_output`, once the data have passed their checks)."""
    out = options.output_dir
    if os.path.isfile(out):
        raise DataError(f"--output-dir {out} is a file")
    used = os.path.isdir(out) and os.listdir(out)
    if options.resume:
        last = get_last_checkpoint(out) if used else None
        if last is None:
            raise DataError(f"--resume: {out} holds no checkpoint-* folder to resume from")
        return last
    if used and not options.overwrite:
        raise DataError(f"--output-dir {out} is not empty: pass --resume to continue its run, or --overwrite to "
                        "start again")
    return None


def clear_output(options: TrainOptions) -> None:
    if options.overwrite and not options.resume and os.path.isdir(options.output_dir) and is_main_process():
        shutil.rmtree(options.output_dir)




# ---- the arguments ------------------------------------------------------------------------------------------------
def part_learning_rates(options: TrainOptions, stage: Stage) -> dict[str, float]:
    """Each part's learning rate: the options', else the stage's (LoRA's rate for the LM's adapters)."""
    adapters = options.lora or options.qlora
    part_lrs = {"bridge": options.bridge_lr if options.bridge_lr is not None else stage.bridge_lr,
                "language_model": options.lm_lr if options.lm_lr is not None else (
                    stage.lora_lr if adapters else stage.lm_lr),
                "vision_tower": options.tower_lr}
    if stage.trains_input_embeddings:
        part_lrs["input_embeddings"] = part_lrs["language_model"]
    return part_lrs


def training_arguments(options: TrainOptions, stage: Stage, learning_rate: float, **extra) -> TrainingArguments:
    """`TrainingArguments` of a stage: the options, the stage's defaults, this machine and launch; `extra` on top."""
    schedule = {"lr_scheduler_type": "cosine"} if not stage.min_lr_rate else {
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": stage.min_lr_rate}}
    return TrainingArguments(
        **machine_arguments(),  # the CPU, and the engine accelerate was launched with
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


def checkpointing_arguments(enabled: bool) -> dict:
    """Non-reentrant activation checkpointing, under the name this transformers gives it (5.24 renamed
    `gradient_checkpointing` to `activation_checkpointing`)."""
    name = "activation_checkpointing" if any(f.name == "activation_checkpointing"
                                             for f in dataclasses.fields(TrainingArguments)) else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}} if enabled else {}


# ---- the run -------------------------------------------------------------------------------------------------------
def run(run: Run) -> dict:
    """Train (stopping cleanly on SIGTERM), then save the model, its processor and a card; returns the summary (stage,
    data, samples, steps, final loss, where the model is). A run resumed from its last step trains no step: it saves
    the checkpoint's weights, with its steps and losses."""
    options, resume_from = run.options, run.resume_from
    logger.warning("trainable parameters per part: %s", ", ".join(f"{k}={v:,}" for k, v in run.trainable.items()))
    arguments = training_arguments(options, run.stage, run.part_lrs["bridge"], **run.arguments)
    clear_output(options)
    clear_data_cache(options, run.data_cache)
    if options.logging_steps is None:
        arguments.logging_steps = logging_interval(arguments, run.dataset)
    stopper = StopOnSignal()
    try:  # the SIGTERM handler is restored whatever fails, building the trainer included
        trainer = run.trainer_class(model=run.model, args=arguments, train_dataset=run.dataset,
                                    eval_dataset=run.eval_dataset, data_collator=run.collator, part_lrs=run.part_lrs,
                                    callbacks=[stopper, LogTheLastStep(), EndAtTheLastStep()])
        trainer.train(resume_from_checkpoint=resume_from)
    except NothingLeftToTrain:
        logger.warning("%s is the run's last step (%d): nothing left to train, saving its model", resume_from,
                       trainer.state.global_step)
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)  # reporters, progress bar
    finally:
        stopper.restore()
    summary = {"stage": run.stage.name, "layout": run.layout, **run.summary, **trainer.data_summary(),
               "steps": trainer.state.global_step, "final_loss": final_loss(trainer.state.log_history),
               "samples_per_second": next((entry["train_samples_per_second"] for entry in
                                           reversed(trainer.state.log_history)
                                           if "train_samples_per_second" in entry), None),
               "trainable_parameters": run.trainable, "learning_rates": run.part_lrs, "output_dir": options.output_dir,
               "options": {k: v for k, v in asdict(options).items() if k not in ("output_dir",)}}
    if stopper.stopped_at is not None:
        summary["stopped_at"] = stopper.stopped_at
        return summary
    save(trainer, run, summary)
    return summary


def save(trainer, run: Run, summary: dict) -> None:
    """The stage's output: the model (LoRA merged into the LM), its processor, and a card recording the training."""
    out, model = run.options.output_dir, run.model
    if run.base_model is not None:
        model = merged(trainer, model, run)  # `None` but on the main process
        if model is not None:
            model.save_pretrained(out)
    else:
        trainer.save_model(out)
    if not trainer.is_world_process_zero():
        return
    run.processor.save_pretrained(out)
    summary["loss_curve"] = LOSS_CURVE if plot_losses(trainer.state.log_history, os.path.join(out, LOSS_CURVE)) \
        else None
    with open(os.path.join(out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    write_model_card(unwrap(model), out, extra=training_section(summary))


def merged(trainer, model, run: Run):
    """The adapters (saved in `adapter/`) and the trained bridge on the base model in full precision, merged; the full
    state dict is gathered from every process (FSDP, ZeRO-3), and the merge happens on the main one."""
    from peft import PeftModel  # peft only when LoRA trained (it imports bitsandbytes, which the CLI may keep out)

    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    adapter = os.path.join(run.options.output_dir, "adapter")
    model.save_pretrained(adapter, state_dict=state)
    trained = {name.removeprefix("base_model.model."): state[name] for name, p in model.named_parameters()
               if p.requires_grad and "lora_" not in name}
    base = run.base_model()
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
    """The model card's `## Training` section, from a run's summary."""
    o = summary["options"]
    steps = f"{summary['steps']} steps" + (f" ({o['epochs']:g} epochs)" if o["max_steps"] < 0 else "")
    adapters = " with LoRA on the LM (merged)" if o["lora"] else " with QLoRA on the LM (merged)" if o["qlora"] else ""
    rows = [("stage", f"`{summary['stage']}` ({summary['layout']} layout){adapters}"),
            ("data", f"`{summary['data']}`, {summary['samples']:,} samples"
                     + (f" ({summary['samples_skipped']} longer than {o['max_length']} tokens skipped)"
                        if summary["samples_skipped"] else "")),
            ("trainable parameters", ", ".join(f"{k} {v:,}" for k, v in summary["trainable_parameters"].items())
             + ("; the LM's output embeddings among them (`--train-output-embeddings`)"
                if o.get("train_output_embeddings") else "")),
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
