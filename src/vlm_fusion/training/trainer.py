"""The recipe on transformers' `Trainer`: per-part learning rates, throughput logging, length-grouped batches, a
streamed dataset's places kept in the checkpoints (`StreamReading`), stopping cleanly on SIGTERM, and a resume from
the last step that trains no step more.
"""

import math
import signal
import time

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging

from .conversations import ConversationDataset
from .models import unwrap
from .streaming import REASONS

logger = logging.get_logger("vlm_fusion.training")


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

    def data_summary(self) -> dict:
        """What the trainer learnt of its data while training, for the run's summary (a stream: `StreamReading`)."""
        return {}

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


# ---- a streamed dataset (`streaming.py`): the readers' places in the checkpoints, the counts in the logs ------------
def gathered(value):
    """`value` from every process (a list), or `[value]` in one."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out
    return [value]


class StreamPositions(TrainerCallback, ExportableState):
    """Every reader's place after the last batch taken from it, in `trainer_state.json` with each checkpoint."""

    def __init__(self, readers: int, places: dict, batches: int):
        self.readers, self.places, self.batches = readers, dict(places), batches

    def state(self) -> dict:
        return {"args": {}, "attributes": {"readers": self.readers, "batches": self.batches,
                                           "places": [self.places[r] for r in sorted(self.places)]}}


class Consumed:
    """The data loader's batches with their reader's place taken off and kept (per process)."""

    def __init__(self, loader, positions: StreamPositions):
        self.loader, self.positions = loader, positions

    def __iter__(self):
        for batch in self.loader:
            place = batch.pop("stream_state").tolist()
            self.positions.places[place[0]] = place
            self.positions.batches += 1
            yield batch


def counts_of(places) -> dict[str, int]:
    return {reason: sum(place[3 + i] for place in places) for i, reason in enumerate(REASONS)}


class StreamReading:
    """Put before a trainer class (`class T(StreamReading, FusionTrainer)`): it reads its `train_dataset`, a
    `streaming.StreamDataset`, with its own data loader, keeps the readers' places in every checkpoint, logs the
    samples skipped as broken and, at the end, reports the stream (`data_summary`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dataset = self.train_dataset
        self.positions = StreamPositions(dataset.stream.readers, dataset.start, dataset.batches)
        self.add_callback(self.positions)

    def own_places(self) -> dict:
        stream = self.train_dataset.stream
        return {r: p for r, p in self.positions.places.items() if r // stream.workers == stream.rank}

    def get_train_dataloader(self):
        args = self.args
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers else None,
            # its own generator: starting the loader draws no number from the RNG a resume restores
            generator=torch.Generator().manual_seed(args.seed))
        return Consumed(loader, self.positions)

    def _save_checkpoint(self, model, trial):
        for places in gathered(self.own_places()):  # every process's readers, in the state rank 0 writes
            self.positions.places.update(places)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            counts = counts_of(self.own_places().values())
            broken = torch.tensor([sum(n for reason, n in counts.items() if reason != "too long")],
                                  dtype=torch.float64)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(broken)
            logs["samples_broken"] = int(broken.item())
        super().log(logs, start_time)

    def data_summary(self) -> dict:
        """What was streamed, by the last checkpoint's places (a run's end or a stop gathered every reader's)."""
        stream, places, args = self.train_dataset.stream, list(self.positions.places.values()), self.args
        counts = counts_of(places)
        broken = {reason: n for reason, n in counts.items() if reason != "too long"}
        samples = (self.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
                   * args.world_size)
        if self.is_world_process_zero():
            logger.warning("streamed %d samples from %d shard(s) over %d reader(s); skipped %s", samples,
                           len(stream.shards), stream.readers, ", ".join(f"{n} {reason}" for reason, n in counts.items()))
        return {"samples": samples, "samples_skipped": counts["too long"], "samples_broken": broken,
                "stream": {"shards": len(stream.shards), "readers": stream.readers,
                           "passes": max((place[1] for place in places), default=0) + 1}}


class StreamingFusionTrainer(StreamReading, FusionTrainer):
    """`FusionTrainer` on streamed image-caption pairs (the `align` stage)."""
