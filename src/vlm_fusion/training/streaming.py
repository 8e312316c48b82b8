"""Image-caption pairs streamed at caption scale (`align`, and BLIP-2's stage 1 `--stage qformer`): WebDataset shards
as `img2dataset` writes them, or a local `datasets` dataset read in streaming mode — never read whole, never read twice.

    --data  ->  shards  ->  each reader's shards (this pass's order)  ->  records (skipped up to the resume point
    without reading their bytes)  ->  checked + decoded (a broken one counted and skipped)  ->  the stage's item
    (+ where the reader is)  ->  the stage's own collator  ->  Trainer, which keeps the readers' places in its checkpoints

What `--data` names. Shards — `'shards/{00000..00999}.tar'` (braces expanded), a glob, a folder of `.tar` files or one
`.tar` — are always streamed: per sample `KEY.jpg|jpeg|png|webp` + `KEY.txt` and/or `KEY.json` (its `"caption"`), the
members of a sample next to each other (img2dataset's layout); or, for clip captions (WebVid-style, `align` with
`--num-frames`), `KEY.mp4|webm|mkv|avi|mov` in place of the image, decoded by PyAV in the data loader's worker. A `datasets` dataset (a `save_to_disk` folder, or
`.parquet` files) is streamed with `--streaming`: without it a folder means TRL's `messages` format, read into memory.
Its image column is `image` (or `jpg` / `png` / `webp`: a PIL image, a path, bytes, or `{"bytes", "path"}`), its
caption column `caption` (or `text` / `txt`).

Why our own reader of tar files (stdlib `tarfile`) and not `webdataset` or `datasets`' `webdataset` builder. What the
run needs — shards split deterministically over (process, data loader worker), a broken shard or sample counted and
skipped, a resume that lands on the very next sample without decoding those before it, counts that reach the log from
worker processes — leaves of `webdataset` only its "open a tar, group members by key" stage (its splitters, shuffles
and `handler=` would have to be bypassed to keep positions exact), about thirty lines here; `datasets`' builder stops
on a shard that is not a tar file and its `state_dict` needs a stateful data loader that `Trainer` does not use.
A `datasets` dataset is read through `datasets`' own streaming (`to_iterable_dataset`, `load_dataset(...,
streaming=True)`), its images decoded here (`Image(decode=False)`) so that a corrupt one is counted, not fatal.

Splitting. There are S readers, processes x data loader workers (`--workers`, or 1); reader `rank * W + worker` reads
the shards `order[reader::S]` of each pass, so readers never share a shard and no process reads another's. Fewer
shards than readers is refused in one line (a `datasets` folder is cut into max(S, rows / 10,000) contiguous shards).
`accelerate`'s own handling of an iterable dataset (rank 0 reads and dispatches, or every rank reads everything) is
not used: the trainer builds the data loader itself (`trainer.StreamReading`).

Passes. The stream never ends: a reader that reaches the end of its shards starts the next pass, its shard order
reshuffled with `random.Random(seed * 1_000_003 + pass)` (pass 0 included); samples keep their order inside a shard
(no sample shuffle buffer: it would have to be refilled on resume). A pass of a reader that yields no sample at all
is an error. The run's length: `--max-steps`, or, when the number of samples is known (a `datasets` dataset; shards
with img2dataset's `*_stats.json` beside every one), `--epochs` over it; otherwise it is refused in one line.

Resume. Each item carries its reader's place (pass, records read in the pass, counts of what was skipped); the trainer
keeps the place of the last batch it took from each reader and, at every checkpoint, gathers them from every process
into `trainer_state.json` (`trainer.StreamPositions`). `--resume` starts each reader at its place: the records before it are
passed over by their headers (tar) or rows (datasets), no image decoded; Trainer's own data skip is off
(`ignore_data_skip`); the data loader's round-robin over workers is rotated to the worker whose batch was next. Same
shards, seed, processes and workers (checked): the resumed run sees exactly the batches the uninterrupted one would
have, and with Trainer's restored RNG state, ends at the same weights. Not reproduced: a different `--workers` or
process count (refused), shards changed on disk, and the worker processes' own random state (the pipeline draws none).

Counted and skipped (never a crash hours in): a shard that is not a readable tar file (or breaks mid-way), a sample
with no image or no caption, an image that does not decode, a clip that does not decode or holds fewer frames than
the model samples, and (align) a sample longer than `--max-length` tokens.
The counts go into the logs (`samples_broken`), the summary and `training_summary.json`.

Legend: S readers (processes x workers), K shards, B samples in a batch.
"""

import glob
import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass, replace
from itertools import islice

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging

from .data import IMAGE, DataError, read_dataset, resolve
from .distributed import rank, world_size

logger = logging.get_logger("vlm_fusion.training")

REASONS = ("unreadable shard", "no image", "no caption", "unreadable image", "too long", "unreadable clip",
           "short clip")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")  # a sample's clip: its bytes, decoded by PyAV
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "txt")
ROWS_PER_SHARD = 10_000  # a `datasets` folder is read in contiguous shards of about this size (img2dataset's default)
WARNINGS_PER_REASON = 3  # per reader: the first few broken samples are named, the rest only counted


class Skip(Exception):
    """A sample the stream passes over, counted under `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---- what --data names: shards ------------------------------------------------------------------------------------
def wanted(options) -> bool:
    """Whether `--data` is streamed: `--streaming`, or shards (which can only be streamed)."""
    return options.streaming or is_shards(options.data)


def is_shards(path: str) -> bool:
    return path.endswith(".tar") or (os.path.isdir(path) and bool(glob.glob(os.path.join(path, "*.tar"))))


def expand_braces(pattern: str) -> list[str]:
    """`{00000..00999}` (zero padding kept) and `{a,b}`, as the shell and WebDataset expand them."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(head + item + tail)]


def shard_paths(pattern: str) -> list[str]:
    """The tar files of a brace pattern, a glob, a folder of `.tar` files or one `.tar`, in order."""
    if os.path.isdir(pattern):
        paths = sorted(glob.glob(os.path.join(pattern, "*.tar")))
    else:
        named = [path for name in expand_braces(pattern) for path in sorted(glob.glob(name)) or [name]]
        paths = [path for path in named if os.path.isfile(path)]
        if paths and len(paths) < len(named):
            logger.warning("%d of the %d shards %s names are missing: streaming the %d there", len(named) - len(paths),
                           len(named), pattern, len(paths))
    if not paths:
        raise DataError(f"--data {pattern}: no shard file matches")
    return paths


def img2dataset_count(paths: list[str]) -> int | None:
    """The number of samples, from img2dataset's `NNNNN_stats.json` beside each shard (`None` if one is missing)."""
    total = 0
    for path in paths:
        stats = path.removesuffix(".tar") + "_stats.json"
        try:
            with open(stats, encoding="utf-8") as f:
                total += int(json.load(f)["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total


def split_name(name: str) -> tuple[str, str]:
    """A tar member's sample key and extension, as WebDataset splits them (at the first dot of the base name)."""
    folder, base = os.path.split(name)
    key, _, extension = base.partition(".")
    return os.path.join(folder, key), extension.lower()


@dataclass
class Record:
    """One raw sample of a shard: its key, and a way to read its (image, caption) that is only taken if it is used."""

    key: str
    where: str
    read: object = None  # () -> (image value, caption value)
    problem: str | None = None  # an unreadable shard: why


@dataclass(frozen=True)
class TarShard:
    path: str

    @property
    def name(self) -> str:
        return self.path

    def records(self):
        """The samples of the tar file, in order; a shard that is not a tar (or breaks) is one record saying why.
        The file is opened seekable: a sample that is passed over is never read, only its headers."""
        try:
            tar = tarfile.open(self.path, "r:")  # img2dataset's shards are plain tar files
        except (tarfile.TarError, OSError) as error:
            yield Record(key="", where=self.path, problem=f"not a readable tar file ({error})")
            return
        with tar:
            key, members = None, {}
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, extension = split_name(member.name)
                    if member_key != key and members:
                        yield self.record(tar, key, members)
                        members = {}
                    key = member_key
                    members[extension] = member
            except (tarfile.TarError, OSError) as error:
                yield Record(key=key or "", where=self.path, problem=f"breaks after sample {key} ({error})")
                return
            if members:
                yield self.record(tar, key, members)

    def record(self, tar, key, members):
        def read():
            image = next((tar.extractfile(members[e]).read() for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None:
                image = next((Clip(tar.extractfile(members[e]).read()) for e in VIDEO_EXTENSIONS if e in members), None)
            caption = None
            if "txt" in members:
                caption = tar.extractfile(members["txt"]).read().decode("utf-8", errors="replace")
            elif "json" in members:
                try:
                    caption = json.loads(tar.extractfile(members["json"]).read()).get("caption")
                except (ValueError, AttributeError):
                    caption = None
            return image, caption

        return Record(key=os.path.basename(key), where=self.path, read=read)


# ---- what --data names: a `datasets` dataset -------------------------------------------------------------------
@dataclass(frozen=True)
class RowsShard:
    """Rows of a local `datasets` dataset in streaming mode: `[start, stop)` of a `save_to_disk` folder, or one file
    of a `.parquet` set."""

    path: str
    index: int
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        return f"{self.path}[{self.start}:{self.stop}]" if self.stop else f"{self.path}#{self.index}"

    def records(self):
        import datasets

        streamed, parquet = open_rows(self.path)
        if parquet:
            streamed = streamed.shard(num_shards=streamed.num_shards, index=self.index)
        else:
            streamed = streamed.select(range(self.start, self.stop)).to_iterable_dataset()
        image_column, caption_column = columns(streamed.features, self.path)
        if isinstance(streamed.features[image_column], datasets.Image):
            streamed = streamed.cast_column(image_column, datasets.Image(decode=False))  # decoded (and checked) here
        row = 0
        for batch in streamed.iter(batch_size=256):  # `iter`, not `__iter__`: the readers are split here, not by datasets
            for image, caption in zip(batch[image_column], batch[caption_column]):
                key = f"{self.index}/{row}" if parquet else str(self.start + row)
                row += 1
                yield Record(key=key, where=self.name, read=lambda image=image, caption=caption: (image, caption))


_OPENED = {}


def open_rows(path: str):
    """A `save_to_disk` dataset (memory-mapped) or `.parquet` files in streaming mode, once per process."""
    if path not in _OPENED:
        import datasets

        files = sorted(glob.glob(path)) if not os.path.isdir(path) else []
        if files and all(f.endswith(".parquet") for f in files):
            _OPENED[path] = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True), True
        else:
            _OPENED[path] = read_dataset(path), False
    return _OPENED[path]


def columns(features, path: str) -> tuple[str, str]:
    image = next((c for c in IMAGE_COLUMNS if c in features), None)
    caption = next((c for c in CAPTION_COLUMNS if c in features), None)
    if image is None or caption is None:
        raise DataError(f"--streaming {path}: needs an image column ({' / '.join(IMAGE_COLUMNS)}) and a caption "
                        f"column ({' / '.join(CAPTION_COLUMNS)}); it has {', '.join(features)}")
    return image, caption


def row_shards(path: str, readers: int) -> tuple[list[RowsShard], int]:
    """The shards of a `datasets` dataset and its number of rows."""
    streamed, parquet = open_rows(path)
    columns(streamed.features, path)
    if parquet:
        import pyarrow.parquet as pq

        files = sorted(glob.glob(path))
        return [RowsShard(path, i) for i in range(streamed.num_shards)], sum(pq.read_metadata(f).num_rows for f in files)
    rows = len(streamed)
    count = max(1, min(rows, max(readers, math.ceil(rows / ROWS_PER_SHARD))))
    bounds = [rows * i // count for i in range(count + 1)]
    return [RowsShard(path, i, bounds[i], bounds[i + 1]) for i in range(count)], rows


# ---- the stream: which reader reads what ---------------------------------------------------------------------------
@dataclass
class Stream:
    name: str
    shards: list
    length: int | None  # samples, when known
    readers: int  # S = processes x workers
    rank: int
    workers: int  # W (1 without data loader workers)


def open_stream(options) -> Stream:
    """The shards of `--data`, checked against the readers before any model is loaded."""
    world = world_size()
    workers = max(options.workers, 1)
    readers = world * workers
    path = options.data
    if is_shards(path):
        paths = shard_paths(path)
        shards, length = [TarShard(p) for p in paths], img2dataset_count(paths)
    elif os.path.isdir(path) or path.endswith(".parquet"):
        if not (os.path.isdir(path) or glob.glob(path)):
            raise DataError(f"--data {path}: no file matches")
        shards, length = row_shards(path, readers)
    else:
        raise DataError(f"--streaming reads WebDataset shards ('shards/{{00000..00099}}.tar', a folder of .tar "
                        f"files) or a local `datasets` dataset (a save_to_disk folder, .parquet); not {path}")
    if len(shards) < readers:
        raise DataError(f"{len(shards)} shard(s) for {world} process(es) x {workers} data loader worker(s): each "
                        f"of the {readers} readers needs a shard of its own; lower --workers or write more shards")
    name = os.path.basename(os.path.normpath(path.split("{")[0])) or path
    return Stream(name, shards, length, readers, rank(), workers)


def pass_order(count: int, seed: int, pass_: int) -> list[int]:
    """The shard order of one pass over the data: a shuffle seeded by the run's seed and the pass."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + pass_).shuffle(order)
    return order


def image_number(key: str) -> int:
    """A number for a sample's image, the same in every process: img2dataset's numeric key, or a hash of the key."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 2


def decode_image(value, image_folder: str | None) -> Image.Image:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(resolve(value, image_folder))
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise TypeError(f"an image of type {type(value).__name__}")
    image.load()
    return image.convert("RGB")


@dataclass(frozen=True)
class Clip:
    """A sample's clip as its shard holds it: a video file's bytes (`KEY.mp4`, WebVid-style shards)."""

    data: bytes


def decode_clip(clip: Clip, num_frames: int | None = None) -> np.ndarray:
    """The clip's frames, `(F, H, W, C)` uint8. With `num_frames`, where the container records its frame count (MP4),
    only the frames the model's video processor samples, as it reads a file's (transformers' uniform
    `default_sample_indices_fn` over that count; decoded up to the last of them, only those converted to RGB), so that
    a long clip is never held whole and the processor takes them all; otherwise every frame (the processor samples
    from them). PyAV raises for bytes that are not a video."""
    import av
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    with av.open(io.BytesIO(clip.data)) as container:
        total = container.streams.video[0].frames
        if num_frames and total >= num_frames:
            keep = default_sample_indices_fn(VideoMetadata(total_num_frames=total), num_frames=num_frames)
            wanted, frames = set(keep.tolist()), []
            for index, frame in enumerate(container.decode(video=0)):
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if index >= keep[-1]:
                    break
            if len(frames) == len(keep):
                return np.stack(frames)
    with av.open(io.BytesIO(clip.data)) as container:  # no count recorded, or fewer frames than it says: all of them
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames")
    return np.stack(frames)


def checked(record: Record, image_folder: str | None, num_frames: int | None = None):
    """The record's decoded image (or a clip's frames) and caption, or `Skip` saying what is wrong with it;
    `num_frames`: the frames the model's video processor samples (a clip must hold at least as many; only those are
    decoded where the container records its frame count)."""
    if record.problem:
        raise Skip("unreadable shard", f"shard {record.where}: {record.problem}")
    image, caption = record.read()
    where = f"sample {record.key} in {record.where}"
    if image is None:
        raise Skip("no image", f"{where}: no image")
    caption = caption.replace(IMAGE, "").strip() if isinstance(caption, str) else ""
    if not caption:
        raise Skip("no caption", f"{where}: no caption")
    if isinstance(image, Clip):
        if num_frames is None:
            raise DataError(f"{where} is a clip and the model reads no video: compose it from parts with "
                            "--num-frames N, or start from a checkpoint that reads clips")
        try:
            frames = decode_clip(image, num_frames)
        except Exception as error:  # PyAV raises many kinds for broken bytes
            raise Skip("unreadable clip", f"{where}: not a clip PyAV can read ({error})") from None
        if len(frames) < num_frames:
            raise Skip("short clip", f"{where}: {len(frames)} frames, fewer than the {num_frames} the model samples")
        return frames, caption
    try:
        image = decode_image(image, image_folder)
    except Exception as error:  # PIL raises many kinds for a broken image
        raise Skip("unreadable image", f"{where}: not a readable image ({error})") from None
    return image, caption


class StreamDataset(torch.utils.data.IterableDataset):
    """The stream of one process: each data loader worker is one reader; `make_item(key, image, caption)` is the
    stage's item (`image` a clip's frames `(F, H, W, C)` where the shard holds a clip and `make_item.num_frames` says
    how many the model samples). `start` holds each reader's place from a checkpoint; worker `w` reads for reader `(w + rotation) % W`, so
that the worker whose batch comes first is the one whose batch was next when the checkpoint was taken."""

    def __init__(self, stream: Stream, make_item, *, seed: int, image_folder: str | None, start: dict | None = None,
                 batches: int = 0):
        self.stream, self.make_item, self.seed, self.image_folder = stream, make_item, seed, image_folder
        self.start, self.batches = start or {}, batches  # the batches this process had taken (at the checkpoint)
        self.rotation = batches % stream.workers  # the data loader takes batches from its workers in turn

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        yield from self.read(self.stream.rank * self.stream.workers + (worker + self.rotation) % self.stream.workers)

    def read(self, reader: int):
        """Reader `reader`'s items from its place on, forever, each with the place after it (`stream_state`)."""
        stream = self.stream
        place = self.start.get(reader) or [reader, 0, 0, *[0] * len(REASONS)]
        pass_, position, counts = place[1], place[2], list(place[3:])
        skip = position
        while True:
            order = pass_order(len(stream.shards), self.seed, pass_)
            mine = [stream.shards[i] for i in order[reader::stream.readers]]
            yielded = False
            for record in islice((r for shard in mine for r in shard.records()), skip, None):
                position += 1
                try:
                    media = checked(record, self.image_folder, getattr(self.make_item, "num_frames", None))
                    item = self.make_item(record.key, *media)
                except Skip as skipped:
                    counts[REASONS.index(skipped.reason)] += 1
                    if counts[REASONS.index(skipped.reason)] <= WARNINGS_PER_REASON:
                        logger.warning("%s: skipped (counted in samples_broken)", skipped)
                    continue
                item["stream_state"] = torch.tensor([reader, pass_, position, *counts])
                yielded = True
                yield item
            if not yielded and skip == 0:
                raise DataError(f"reader {reader} found no usable sample in its {len(mine)} shard(s) "
                                f"({', '.join(s.name for s in mine[:3])}): see the warnings above")
            pass_, position, skip = pass_ + 1, 0, 0


# ---- the batches: the stage's collator, the reader's place kept beside ----------------------------------------
class StreamCollator:
    """The stage's own collator; the batch also carries its reader's place (the last item's: a batch is one
    reader's), which the trainer takes off before the model sees the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        state = items[-1]["stream_state"]
        batch = self.collator([{k: v for k, v in item.items() if k != "stream_state"} for item in items])
        batch["stream_state"] = state
        return batch


# ---- the run: its length, where each reader resumes ---------------------------------------------------------
def run_length(options, stream: Stream):
    """`options` with `max_steps` set: given, or `--epochs` over the known number of samples."""
    if options.max_steps > 0:
        return options
    if stream.length is None:
        raise DataError(f"streaming {len(stream.shards)} shard(s): the number of samples is unknown (no "
                        "img2dataset *_stats.json beside every shard), so --epochs cannot be counted: give "
                        "--max-steps")
    world = stream.readers // stream.workers
    steps = max(1, math.ceil(options.epochs * stream.length / (options.batch_size * options.gradient_accumulation
                                                               * world)))
    logger.warning("streaming %d samples: --epochs %g is %d steps", stream.length, options.epochs, steps)
    return replace(options, max_steps=steps)


def resume_places(resume_from: str | None, stream: Stream) -> tuple[dict, int]:
    """Each reader's place and the batches each process had taken, from the checkpoint (nothing for a new run)."""
    if resume_from is None:
        return {}, 0
    with open(os.path.join(resume_from, "trainer_state.json"), encoding="utf-8") as f:
        saved = json.load(f).get("stateful_callbacks", {}).get("StreamPositions")
    if saved is None:
        raise DataError(f"--resume: {resume_from} was not taken by a streamed run, so it holds no place in the "
                        "stream to continue from")
    attributes = saved["attributes"]
    if attributes["readers"] != stream.readers:
        raise DataError(f"--resume: {resume_from} was taken with {attributes['readers']} readers (processes x "
                        f"workers), this run has {stream.readers}: resume with the same processes and --workers")
    return {place[0]: place for place in attributes["places"]}, attributes["batches"]


def stream_dataset(options, stream: Stream, make_item, resume_from: str | None) -> StreamDataset:
    """The stream of this process, each reader at its place in `resume_from` (from the start in a new run)."""
    places, batches = resume_places(resume_from, stream)
    return StreamDataset(stream, make_item, seed=options.seed, image_folder=options.image_folder, start=places,
                         batches=batches)


def check_streamed_options(options) -> None:
    """What a streamed run cannot do, refused in one line before anything is read."""
    if options.stage not in ("align", "qformer"):
        raise DataError(f"streamed data are image-caption pairs: --stage align or --stage qformer, not "
                        f"{options.stage}")
    for flag, value in (("--group-by-length", options.group_by_length), ("--lora", options.lora),
                        ("--qlora", options.qlora)):
        if value:
            raise DataError(f"{flag} does not apply to streamed image-caption pairs")
    if options.eval_data:
        raise DataError("--eval-data is not read beside streamed --data (not built yet): evaluate the output with "
                        "a run on JSON data, or drop --eval-data")


