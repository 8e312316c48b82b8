"""The recipe on transformers' `Trainer`: the dataset and collator, per-part learning rates, throughput logging,
stopping cleanly on SIGTERM, and a resume from the last step that trains no step more.

Legend: B samples in a batch, T longest sample, N images in the batch.
"""

import math
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from .data import DataError, open_image
from .encoding import IGNORE_INDEX, expand


class ConversationDataset(torch.utils.data.Dataset):
    """The encoded samples of a data pass (`cache.Prepared`: a memory-mapped Arrow file), those of `indices` only
    (the ones within `--max-length`); an item's ids and labels are expanded and its images read and processed when it
    is asked for, so the loop holds no sample it is not batching."""

    def __init__(self, processor, prepared, indices: np.ndarray | None = None):
        self.processor, self.rows, self.source = processor, prepared.dataset, prepared.source
        self.indices = np.arange(len(self.rows)) if indices is None else np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.rows.data.column("length"))[self.indices]

    def __getitem__(self, index) -> dict:
        row = self.rows[int(self.indices[index])]
        input_ids, labels = expand(row["ids"], row["targets"], row["image_tokens"], self.processor.image_token_id)
        return model_item(self.processor, row["id"], [open_image(image) for image in self.images(row)], row["text"],
                          row["add_special_tokens"], input_ids, labels, row["instruction"])

    def images(self, row) -> list:
        """A row's images: its files, or (a TRL dataset holding them) the images of its source row."""
        if all(row["images"]):
            return row["images"]
        return list(self.source[row["source_index"]]["images"])


def model_item(processor, sid: str, images: list, text: str, add_special_tokens: bool, input_ids, labels,
               instruction: str) -> dict:
    """What the model reads of one sample: the processor's output for its images and text, with the recipe's labels
    (aligned to the recipe's ids, which must be the processor's) and, for InstructBLIP, the instruction's ids."""
    out = processor(images=images or None, text=[text], add_special_tokens=add_special_tokens, return_tensors="pt")
    ids = out["input_ids"][0]
    if not np.array_equal(ids.numpy(), np.asarray(input_ids)):  # the processor is the truth
        raise DataError(f"sample {sid}: the processor's token ids differ from the recipe's; its labels cannot be placed "
                        "(please report this with the sample)")
    item = {"input_ids": ids, "labels": torch.as_tensor(np.asarray(labels)), "attention_mask": torch.ones_like(ids)}
    if "qformer_input_ids" in out:  # InstructBLIP: the Q-Former reads the instruction, never the answer
        item.update({k: v[0] for k, v in processor.qformer_inputs([instruction], return_tensors="pt").items()})
    for key in out:
        if key not in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
            item[key] = out[key]  # pixel_values (n, ...), anyres image_sizes (n, 2): per image
    return item


class Collator:
    """Pads each sample's sequences on the right (labels with -100) and joins the images of the batch, in order."""

    def __init__(self, pad_token_id: int, per_image: tuple[str, ...], qformer_pad_token_id: int = 0):
        self.pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0,
                    "qformer_input_ids": qformer_pad_token_id, "qformer_attention_mask": 0}
        self.per_image = ("pixel_values", *per_image)

    def __call__(self, items: list[dict]) -> dict:
        batch = {}
        for key, value in self.pad.items():
            rows = [item[key] for item in items if key in item]
            if rows:
                length = max(len(row) for row in rows)
                padded = torch.full((len(rows), length), value, dtype=rows[0].dtype)  # (B, T)
                for i, row in enumerate(rows):
                    padded[i, : len(row)] = row
                batch[key] = padded
        for key in self.per_image:
            groups = [item[key] for item in items if key in item]
            if groups:
                batch[key] = torch.cat(pad_to_common_shape(groups))  # (N, ...)
        return batch


def pad_to_common_shape(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad every dimension after the first to the largest (anyres: each image's tiles)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            padded = t.new_zeros(t.shape[0], *shape)
            padded[tuple(slice(0, s) for s in t.shape)] = t
            t = padded
        out.append(t)
    return out


def unwrap(model):
    """The vlm-fusion model inside a PEFT wrapper (or the model itself)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(inner, "parameter_parts") else model


class FusionTrainer(Trainer):
    """`Trainer` with one learning rate per part (`part_lrs`: vision_tower / bridge / language_model / input
    embeddings), throughput in the logs, and length-grouped batches from the recipe's own lengths."""

    def __init__(self, *args, part_lrs: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.part_lrs = part_lrs
        self._last_log = None

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        inner = unwrap(opt_model)
        embeddings = {id(inner.get_input_embeddings().weight)}
        part_of = {id(p): part for part, params in inner.parameter_parts().items() for p in params.values()}
        groups = {}
        for name, parameter in opt_model.named_parameters():
            if not parameter.requires_grad:
                continue
            part = "input_embeddings" if id(parameter) in embeddings and "input_embeddings" in self.part_lrs \
                else part_of.get(id(parameter), "language_model")  # LoRA adapters sit in the LM
            key = (part, name in decay)
            groups.setdefault(key, []).append(parameter)
        param_groups = [{"params": params, "lr": self.part_lrs[part],
                         "weight_decay": self.args.weight_decay if decays else 0.0, "part": part}
                        for (part, decays), params in sorted(groups.items())]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)  # each group has its own
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, ConversationDataset):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths)
        return super()._get_train_sampler(train_dataset)

    def training_step(self, *args, **kwargs):
        if self._last_log is None:  # the first window starts with the first step
            self._last_log = (time.perf_counter(), self.state.global_step, self.state.num_input_tokens_seen)
        return super().training_step(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds samples/s and tokens/s since the previous log (the window, not the whole run)."""
        now, step, tokens = time.perf_counter(), self.state.global_step, self.state.num_input_tokens_seen
        if "loss" in logs and self._last_log is not None:
            last_time, last_step, last_tokens = self._last_log
            elapsed = max(now - last_time, 1e-9)
            logs["samples_per_second"] = round((step - last_step) * self.args.train_batch_size
                                               * self.args.gradient_accumulation_steps * self.args.world_size
                                               / elapsed, 3)
            if self.args.include_num_input_tokens_seen not in (False, None, "no"):
                logs["tokens_per_second"] = round((tokens - last_tokens) / elapsed, 1)
        if "loss" in logs:
            self._last_log = (now, step, tokens)
        super().log(logs, start_time)


class StopOnSignal(TrainerCallback):
    """SIGTERM (a scheduler's pre-emption, `kill`) ends training after the step under way, with a checkpoint to resume
    from; every process stops at the same step (the flag is shared with an all-reduce)."""

    def __init__(self):
        self.received = False
        self.stopped_at = None
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        flag = self.received
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = torch.tensor([int(flag)], device="cpu" if dist.get_backend() == "gloo" else args.device)
            dist.all_reduce(shared, op=dist.ReduceOp.MAX)
            flag = bool(shared.item())
        if flag:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class LogTheLastStep(TrainerCallback):
    """The run's last step (its end, or a stop) is always logged: a run shorter than `logging_steps` still shows its
    loss, and the summary and the card their final loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True
        return control


LOG_EVERY, LOG_POINTS = 10, 20


def logging_interval(args, dataset) -> int:
    """`--logging-steps`' default: every step of a run of up to 20 steps, 20 points for up to 200, every 10 after, so
    a short run's loss (the picture, TensorBoard) is a curve and a long one logs every 10 steps, as it did.
    A streamed dataset of unknown length without `max_steps` logs every 10."""
    steps = args.max_steps
    if steps <= 0:
        try:
            samples = len(dataset)
        except TypeError:
            return LOG_EVERY
        batches = math.ceil(samples / (args.per_device_train_batch_size * args.world_size))  # per process
        steps = math.ceil(math.ceil(batches / args.gradient_accumulation_steps) * args.num_train_epochs)
    return min(LOG_EVERY, max(1, math.ceil(steps / LOG_POINTS)))


class NothingLeftToTrain(Exception):
    """Raised by `EndAtTheLastStep` at the start of a run resumed from its last step."""


class EndAtTheLastStep(TrainerCallback):
    """A run resumed from a checkpoint at its last step (killed while saving the model) trains no step: transformers
    checks `max_steps` only after a step, and when that checkpoint falls inside an epoch its loop resumes the epoch and
    trains one step more. Raised as that epoch begins, the checkpoint's weights, optimizer and state loaded and every
    callback started (every process alike); `run_stage` catches it, ends the callbacks and saves what was loaded."""

    def on_epoch_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:
            raise NothingLeftToTrain


def final_loss(log_history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry and math.isfinite(entry["loss"])]
    return losses[-1] if losses else None
