"""The generation families' stages (`align`, `instruct`, `flamingo`) as runs: a vlm-fusion generation model — a
checkpoint, BLIP-2's stage 1 with an LM, or one composed from a tower and an LM — on conversations or, for `align`, on
image-caption pairs streamed from shards.

    conversations:  the processor (configs only)  ->  the data pass (conversations.py)  ->  the model, frozen (LoRA /
                    QLoRA on the LM if asked)  ->  Run
    streamed pairs: the shards, checked against the readers (streaming.py)  ->  the model, frozen  ->  each pair as a
                    one-turn conversation (`AlignItems`)  ->  Run
"""

import numpy as np

from .conversations import ConversationDataset, batch_collator, model_item, plain_end, prepare_data
from .data import IMAGE, VIDEO, Conversation, DataError
from .encoding import Encoder, expand
from .models import load_generation_model, load_processor, model_to_train
from .options import TrainOptions
from .runner import Run, part_learning_rates, prepare_output
from .stages import STAGES, Stage
from .streaming import Skip, StreamCollator, check_streamed_options, open_stream, run_length, stream_dataset, wanted
from .trainer import StreamingFusionTrainer


def generation_run(options: TrainOptions) -> Run:
    """The run of `options.stage` (align, instruct or flamingo)."""
    stage = STAGES[options.stage]
    if options.lora and options.qlora:
        raise DataError("--lora and --qlora: choose one")
    if (options.lora or options.qlora) and not stage.trains_language_model:
        raise DataError(f"--lora / --qlora adapt the LM, which the {stage.name} stage keeps frozen")
    resume_from = prepare_output(options)
    layout = options.layout or stage.layout
    if wanted(options):  # image-caption pairs streamed from shards or a `datasets` dataset
        return streamed_pairs_run(options, stage, layout, resume_from)
    return conversations_run(options, stage, layout, resume_from)


def conversations_run(options: TrainOptions, stage: Stage, layout: str, resume_from: str | None) -> Run:
    """The stage on `--data` (and `--eval-data`): LLaVA JSON or TRL conversations, through the data pass."""
    processor = load_processor(options)
    prepared, kept, too_long = prepare_data(options, processor, layout, options.data)
    evaluation = prepare_data(options, processor, layout, options.eval_data, "--eval-data") if options.eval_data \
        else None
    model, processor, trainable = model_to_train(options, stage)
    summary = {"data": prepared.name, "samples": len(kept), "samples_skipped": too_long,
               "data_cache": {"folder": prepared.folder, "built": prepared.built}}
    if evaluation is not None:
        summary["eval_data"] = {"data": evaluation[0].name, "samples": len(evaluation[1]),
                                "samples_skipped": evaluation[2]}
    arguments = dict(include_num_input_tokens_seen="non_padding",
                     train_sampling_strategy="group_by_length" if options.group_by_length else "random")
    if evaluation is not None:  # the held-out loss every --eval-steps (default: at each checkpoint, --save-steps)
        arguments.update(eval_strategy="steps", eval_steps=options.eval_steps or options.save_steps,
                         per_device_eval_batch_size=options.batch_size, prediction_loss_only=True)
    adapters = options.lora or options.qlora
    return Run(options, stage, layout, model, processor, trainable, part_learning_rates(options, stage),
               dataset=ConversationDataset(processor, prepared, kept), collator=batch_collator(model, processor),
               summary=summary, arguments=arguments, resume_from=resume_from,
               eval_dataset=ConversationDataset(processor, *evaluation[:2]) if evaluation else None,
               data_cache=[prepared.folder] + ([evaluation[0].folder] if evaluation else []),
               base_model=(lambda: load_generation_model(options, quantize=False)[0]) if adapters else None)


def streamed_pairs_run(options: TrainOptions, stage: Stage, layout: str, resume_from: str | None) -> Run:
    """The `align` stage on image-caption pairs streamed from WebDataset shards or a `datasets` dataset."""
    check_streamed_options(options)
    stream = open_stream(options)
    options = run_length(options, stream)
    model, processor, trainable = model_to_train(options, stage)
    items = AlignItems(processor, layout, plain_end(options, processor), options.max_length)
    return Run(options, stage, layout, model, processor, trainable, part_learning_rates(options, stage),
               dataset=stream_dataset(options, stream, items, resume_from),
               collator=StreamCollator(batch_collator(model, processor)),
               summary={"data": stream.name, "samples": 0, "samples_skipped": 0},
               arguments=dict(include_num_input_tokens_seen="non_padding", ignore_data_skip=True),
               resume_from=resume_from, trainer_class=StreamingFusionTrainer)


class AlignItems:
    """The `align` stage's item, as `conversations.ConversationDataset` makes it for the same pair in LLaVA's JSON: one user
    turn `<image>` (or `<video>`: a clip's frames, `(F, H, W, C)`), one assistant turn the caption, encoded in the
    stage's layout (by the data pass's `Encoder`)."""

    def __init__(self, processor, layout: str, plain_end: str, max_length: int):
        self.processor, self.max_length = processor, max_length
        self.encoder = Encoder(processor, layout, plain_end)
        video_processor = getattr(processor, "video_processor", None)
        self.num_frames = video_processor.num_frames if video_processor is not None else None  # a clip holds this many

    def __call__(self, key: str, media, caption: str) -> dict:
        clip = isinstance(media, np.ndarray)
        images, videos = ([], [media]) if clip else ([media], [])
        conversation = Conversation(key, [{"role": "user", "content": VIDEO if clip else IMAGE},
                                          {"role": "assistant", "content": caption}], images, videos)
        row = self.encoder(conversation, [(image.height, image.width) for image in images])
        if row["length"] > self.max_length:
            raise Skip("too long", f"sample {key}: {row['length']} tokens, over --max-length {self.max_length}")
        input_ids, labels = expand(row, self.processor)
        return model_item(self.processor, key, images, row["text"], row["add_special_tokens"], input_ids, labels,
                          row["instruction"], videos)
