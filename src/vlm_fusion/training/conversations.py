"""LLaVA JSON / TRL conversations as a dataset: the data pass (`cache.py`) once, then the samples within `--max-length`
read back as the model's items, and the collator that batches them.

    --data  ->  cache.prepare (checked + encoded once, memory-mapped)  ->  the samples within --max-length
            ->  ConversationDataset (ids and labels expanded, images read, when an item is asked for)  ->  Collator

Legend: B samples in a batch, T longest sample, N images in the batch.
"""

import numpy as np
import torch
from transformers.utils import logging

from .cache import clear, default_root, human_size, prepare
from .data import DataError, open_image
from .distributed import is_main_process
from .encoding import IGNORE_INDEX, expand

logger = logging.get_logger("vlm_fusion.training")


def plain_end(options, processor) -> str:
    if options.plain_end is not None:
        return options.plain_end
    return getattr(processor, "end_of_chunk_token", None) or "\n"  # LLaVA's separator; Flamingo's <|endofchunk|>


def prepare_data(options, processor, layout: str, path: str, flag: str = "--data"):
    """The data pass (`cache.prepare`: every sample read, checked and encoded once, then cached) and the samples within
    `--max-length`: longer ones are refused (or skipped, with a count), never cut. Returns `(prepared, indices,
    skipped)`."""
    try:
        prepared = prepare(path, options.image_folder, processor, layout, plain_end(options, processor),
                           root=options.data_cache, workers=options.data_workers, show_progress=is_main_process())
    except DataError as error:
        raise DataError(f"{flag}: {error}" if flag != "--data" else str(error)) from None
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
            raise DataError(message + ": raise --max-length, or pass --skip-too-long")
        logger.warning("%s: skipped.", message)
        if not len(keep):
            raise DataError(message + ", and no sample is left")
    return prepared, keep, skipped


def clear_data_cache(options, used: list[str]) -> None:
    """`--clear-data-cache`: the main process removes the cache's folders but `used` (this run's data passes)."""
    if not options.clear_data_cache or not is_main_process():
        return
    root = options.data_cache or default_root()
    removed, freed = clear(root, keep=used)
    logger.warning("data cache: removed %d data pass(es) this run does not use from %s, %s", removed, root,
                   human_size(freed))


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
        input_ids, labels = expand(row, self.processor)
        return model_item(self.processor, row["id"], [open_image(image) for image in self.images(row)], row["text"],
                          row["add_special_tokens"], input_ids, labels, row["instruction"], row["videos"])

    def images(self, row) -> list:
        """A row's images: its files, or (a TRL dataset holding them) the images of its source row."""
        if all(row["images"]):
            return row["images"]
        return list(self.source[row["source_index"]]["images"])


def model_item(processor, sid: str, images: list, text: str, add_special_tokens: bool, input_ids, labels,
               instruction: str, videos: list = ()) -> dict:
    """What the model reads of one sample: the processor's output for its images, clips and text, with the recipe's
    labels (aligned to the recipe's ids, which must be the processor's) and, for InstructBLIP, the instruction's ids.
    A clip's frames are decoded here, in the data loader's workers, and only the sampled ones."""
    media = {"videos": list(videos)} if len(videos) else {}
    out = processor(images=images or None, text=[text], add_special_tokens=add_special_tokens, return_tensors="pt",
                    **media)
    ids = out["input_ids"][0]
    if not np.array_equal(ids.numpy(), np.asarray(input_ids)):  # the processor is the truth
        raise DataError(f"sample {sid}: the processor's token ids differ from the recipe's; its labels cannot be placed "
                        "(please report this with the sample)")
    item = {"input_ids": ids, "labels": torch.as_tensor(np.asarray(labels)), "attention_mask": torch.ones_like(ids)}
    if "qformer_input_ids" in out:  # InstructBLIP: the Q-Former reads the instruction, never the answer
        item.update({k: v[0] for k, v in processor.qformer_inputs([instruction], return_tensors="pt").items()})
    for key in out:
        if key not in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
            item[key] = out[key]  # pixel_values (n, ...), anyres image_sizes (n, 2): per image; pixel_values_videos
    return item


class Collator:
    """Pads each sample's sequences on the right (labels with -100) and joins the images of the batch, in order, and
    its clips (each sampled to the processor's `num_frames`: one frame count per batch)."""

    def __init__(self, pad_token_id: int, per_image: tuple[str, ...], qformer_pad_token_id: int = 0):
        self.pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0,
                    "qformer_input_ids": qformer_pad_token_id, "qformer_attention_mask": 0}
        self.per_image = ("pixel_values", *per_image, "pixel_values_videos")  # pixel_values_videos (V, F, C, H, W)

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


def batch_collator(model, processor):
    """The collator of the generation families: the tokenizer's padding id (else EOS), the model's per-image inputs."""
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    inner = getattr(getattr(model, "base_model", None), "model", model)
    return Collator(pad, inner.model_class._per_image_inputs, getattr(inner.config, "qformer_pad_token_id", 0))
