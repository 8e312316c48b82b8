"""The data pass, once: every sample read, checked and encoded in worker processes, written to a memory-mapped Arrow
file on disk, and reused by every process of a launch, by `--resume` and by a rerun.

    --data (streamed, never whole in memory) --blocks--> workers: check, open each image, encode (`Encoder`)
        --rows, in order--> one Arrow file  <--memory-mapped-- every training process (`ConversationDataset`)

Why our own Arrow file and not `datasets.map`: the pass must stream a 665K-sample JSON list (which `datasets` loads
whole), run in workers that hold the processor once, and be keyed by what the samples depend on — which `map`'s
fingerprint (a hash of the function and its pickled arguments) cannot say for a processor. The file itself is
written with `datasets`' `ArrowWriter` and read back with `datasets.Dataset.from_file`, memory-mapped: pages are
shared by every process that reads it, and a sample is materialised only when its batch is built.

The cache folder is `--data-cache` (default `$VLM_FUSION_DATA_CACHE`, else `~/.cache/vlm_fusion/data`), one
sub-folder per fingerprint of: the format and vlm-fusion's version, the data (path, size, modification time; every
file of a dataset folder), the image folder, the processor's saved files (tokenizer, chat template, image
processor, placeholder counts), the layout and the plain layout's end. The images the data lists are fingerprinted
too, by size and modification time, checked again (in threads) each time the cache is used: a changed image
rebuilds it. `--max-length` is not part of it: the cache keeps every sample with its length, and the samples over
the limit are refused or skipped when it is read. One process builds while the others wait on a file lock; a
folder is written under a temporary name and renamed when complete, so a killed build leaves nothing that is used.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import filelock
import numpy as np
from tqdm.auto import tqdm
from transformers.utils import logging

from vlm_fusion import __version__

from .data import Block, DataError, blocks, check, clip_frames, image_size, read_dataset
from .encoding import Encoder

logger = logging.get_logger("vlm_fusion.training")

FORMAT = 3  # the layout of a cache folder; a change makes every older cache a miss
BLOCK = 256  # samples a worker checks and encodes at a time
WRITE_ROWS = 8192  # samples per record batch of the file (a cold open of a 665K-sample file: ~80 headers, not 2,600)
FEATURES = ("id", "source_index", "images", "videos", "text", "add_special_tokens", "instruction", "ids", "targets",
            "image_tokens", "video_tokens", "length")  # a cached sample: `ids` the text's own ids (one `<image>` per
# image, one `<video>` per clip), `targets` a flag per id (the loss is on it), `image_tokens` / `video_tokens` each
# image's / clip's placeholder count, `length` the expanded length


def features():
    from datasets import Features, Sequence, Value

    return Features({"id": Value("string"), "source_index": Value("int64"), "images": [Value("string")],
                     "videos": [Value("string")], "text": Value("string"), "add_special_tokens": Value("bool"),
                     "instruction": Value("string"), "ids": Sequence(Value("int32")),
                     "targets": Sequence(Value("bool")), "image_tokens": Sequence(Value("int32")),
                     "video_tokens": Sequence(Value("int32")), "length": Value("int32")})


@dataclass
class Prepared:
    """A data pass's result: the encoded samples (`datasets.Dataset`, memory-mapped) and where they came from."""

    dataset: object
    name: str  # the data's name, for the summary and the card
    folder: str  # the cache folder
    built: bool  # this process ran the data pass (else it read a cache)
    source: object = None  # a `datasets` dataset whose rows hold in-memory images (TRL format), or None


def default_root() -> str:
    return os.environ.get("VLM_FUSION_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlm_fusion",
                                                                    "data")


def prepare(path: str, image_folder: str | None, processor, layout: str, plain_end: str, root: str | None = None,
            workers: int | None = None, show_progress: bool = True) -> Prepared:
    """The encoded samples of `path`, from the cache if it holds them, else from a data pass (then cached)."""
    try:
        from datasets import Dataset
    except ImportError:
        raise DataError("the data pass writes its cache with `datasets`, which is not installed: "
                        "pip install 'vlm-fusion[train]'") from None

    if not os.path.exists(path):
        raise DataError(f"no training data at {path}")
    root = writable(root or default_root())
    key, inputs = fingerprint(path, image_folder, processor, layout, plain_end)
    folder = os.path.join(root, key)
    with filelock.FileLock(folder + ".lock"):
        built = not valid(folder)
        if built:
            shutil.rmtree(folder, ignore_errors=True)
            build(folder, path, image_folder, processor, layout, plain_end, inputs, workers, show_progress)
        else:
            logger.warning("data cache: reused %s (the data pass is not run again)", folder)
    if show_progress:  # the main process
        entries, size = usage(root)
        logger.warning("data cache: %s holds %d data pass(es), %s (--clear-data-cache removes those a run does not "
                       "use)", root, entries, human_size(size))
    dataset = Dataset.from_file(os.path.join(folder, "samples.arrow"))
    source = read_dataset(path) if in_memory_images(dataset) else None
    return Prepared(dataset, os.path.basename(os.path.normpath(path)), folder, built, source)


def writable(root: str) -> str:
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as error:
        raise DataError(f"--data-cache {root} is not a writable folder ({error.strerror or error}); give one "
                        "that is") from None
    return root


# ---- how big it is, and clearing it -------------------------------------------------------------------------------
def entries(root: str) -> list[str]:
    """The cache folders of `root` (one per fingerprint), complete or partial."""
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if os.path.isdir(os.path.join(root, name)))


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(top, name)) for top, _, names in os.walk(folder) for name in names)


def usage(root: str) -> tuple[int, int]:
    """(data passes, bytes) the cache folder `root` holds."""
    folders = [f for f in entries(root) if ".partial-" not in os.path.basename(f)]
    return len(folders), sum(folder_size(f) for f in entries(root))


def clear(root: str, keep=()) -> tuple[int, int]:
    """Removes the cache folders of `root` but `keep` (and any a process is building or checking: its lock is held);
    returns (folders, bytes) removed. A process that memory-maps a removed file keeps reading it."""
    keep = {os.path.realpath(k) for k in keep}
    removed, freed = 0, 0
    for folder in entries(root):
        key = folder.split(".partial-")[0]
        if os.path.realpath(key) in keep:
            continue
        try:
            with filelock.FileLock(key + ".lock", timeout=0):
                size = folder_size(folder)
                shutil.rmtree(folder)
                if os.path.realpath(key) == os.path.realpath(folder):  # the entry's lock goes with it
                    with contextlib.suppress(OSError):
                        os.remove(key + ".lock")
        except filelock.Timeout:
            continue
        removed, freed = removed + 1, freed + size
    return removed, freed


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


# ---- the fingerprint -----------------------------------------------------------------------------------------------
def fingerprint(path, image_folder, processor, layout, plain_end) -> tuple[str, dict]:
    """The cache key and what went into it (kept in the cache's `meta.json`, for a reader)."""
    inputs = {"format": FORMAT, "vlm_fusion": __version__, "data": files_stamp(path),
              "image_folder": os.path.realpath(image_folder) if image_folder else None,
              "processor": processor_digest(processor), "layout": layout, "plain_end": plain_end}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]
    return f"{os.path.basename(os.path.normpath(path))}-{layout}-{digest}", inputs


def files_stamp(path: str) -> list:
    """`[relative path, size, modification time]` of the file, or of every file in the folder."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return [[os.path.realpath(path), stat.st_size, stat.st_mtime_ns]]
    stamps = []
    for folder, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            stat = os.stat(os.path.join(folder, name))
            stamps.append([os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns])
    return [[os.path.realpath(path), 0, 0], *stamps]


def processor_digest(processor) -> str:
    """A hash of the processor's saved files: its tokenizer, chat template, image processor and settings."""
    volatile = ("local_files_only", "is_local", "_commit_hash", "name_or_path", "processor_class")
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        digest = hashlib.sha256()
        names = sorted(os.path.relpath(os.path.join(parent, name), folder)  # InstructBLIP: a qformer_tokenizer/ too
                       for parent, _, files in os.walk(folder) for name in files)
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                content = f.read()
            if name.endswith(".json"):  # drop what records where and how it was loaded, not what it does
                try:
                    content = json.dumps(strip_keys(json.loads(content), volatile), sort_keys=True).encode()
                except ValueError:
                    pass
            digest.update(name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()


def strip_keys(value, keys):
    if isinstance(value, dict):
        return {k: strip_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [strip_keys(v, keys) for v in value]
    return value


def image_stamps(paths) -> list:
    """`[size, modification time]` of each image or clip file, and of each file of a frames folder (threads: the
    calls wait on the file system, not the GIL)."""
    def stamp(path):
        try:
            if os.path.isdir(path):  # a clip's frames folder
                return [[name, *stamp(os.path.join(path, name))] for name in sorted(os.listdir(path))]
            stat = os.stat(path)
            return [stat.st_size, stat.st_mtime_ns]
        except OSError:
            return None

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(stamp, paths, chunksize=4096))


def valid(folder: str) -> bool:
    """Whether `folder` is a complete cache whose images are unchanged since it was built."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("inputs", {}).get("format") != FORMAT:
        return False
    with open(os.path.join(folder, "images.json"), encoding="utf-8") as f:
        images = json.load(f)
    changed = [path for path, before, now in zip(images["paths"], images["stamps"], image_stamps(images["paths"]))
               if before != now]
    if changed:
        logger.warning("data cache: %d image(s) changed since %s was built (e.g. %s): building it again",
                       len(changed), folder, changed[0])
        return False
    return True


# ---- the data pass -------------------------------------------------------------------------------------------------
def build(folder, path, image_folder, processor, layout, plain_end, inputs, workers, show_progress) -> None:
    """Read, check and encode every sample into `folder` (written as `folder.partial-PID`, then renamed)."""
    from datasets.arrow_writer import ArrowWriter

    start = time.perf_counter()
    partial = f"{folder}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    workers = workers if workers is not None else default_workers()
    samples_in_blocks = blocks(path, image_folder, BLOCK)
    images, samples = {}, 0
    try:
        writer = ArrowWriter(features=features(), path=os.path.join(partial, "samples.arrow"))
        with tqdm(desc=f"data pass over {os.path.basename(path)} ({workers or 1} worker(s))", unit=" samples",
                  disable=not show_progress) as progress, worker_pool(workers, processor, layout, plain_end) as run:
            pending = []  # blocks joined into record batches of WRITE_ROWS or more: opening the file reads a header each
            for rows, block_images in run(samples_in_blocks):
                pending.append(rows)
                if sum(batch.num_rows for batch in pending) >= WRITE_ROWS:
                    write_joined(writer, pending)
                    pending = []
                images.update(block_images)
                samples += rows.num_rows
                progress.update(rows.num_rows)
            if pending:
                write_joined(writer, pending)
        writer.finalize()
        writer.close()
        if not samples:
            raise DataError(f"{path} holds no samples")
        paths = sorted(images)
        with open(os.path.join(partial, "images.json"), "w", encoding="utf-8") as f:
            json.dump({"paths": paths, "stamps": image_stamps(paths)}, f)
        with open(os.path.join(partial, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"inputs": inputs, "samples": samples, "images": len(paths), "workers": workers,
                       "seconds": round(time.perf_counter() - start, 2)}, f, indent=1)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.warning("data cache: built %s: %d samples, %d images (and clips) checked, in %.1f s", folder, samples,
                   len(images), time.perf_counter() - start)


def write_joined(writer, batches) -> None:
    import pyarrow as pa

    table = pa.Table.from_batches(batches).combine_chunks()
    writer.write_table(table, writer_batch_size=table.num_rows)


def default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 16) if cores > 1 else 0


class worker_pool:
    """`with worker_pool(n, ...) as run: for rows, images in run(blocks)`: the blocks encoded in `n` processes (in
    order), or in this one for `n == 0`. Workers are forked, so the processor is not pickled; where fork is not
    available they are spawned with it."""

    def __init__(self, workers, processor, layout, plain_end):
        self.workers, self.arguments, self.pool = workers, (processor, layout, plain_end), None

    def __enter__(self):
        if self.workers:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with default_termination():
                self.pool = multiprocessing.get_context(method).Pool(self.workers, initializer=start_worker,
                                                                     initargs=self.arguments)
        else:
            start_worker(*self.arguments)
        return self.run

    def run(self, blocks):
        if self.pool is None:
            yield from map(encode_block, blocks)
        else:
            yield from self.pool.imap(encode_block, blocks, chunksize=1)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


_encoder: Encoder | None = None
_image_sizes: dict = {}
_clip_frames: dict = {}


@contextlib.contextmanager
def default_termination():
    """SIGTERM and SIGHUP at their default (terminate) while workers are forked, so that each worker is born with it.
    A forked worker inherits this process's handlers: one that only sets a flag (a training run's SIGTERM handler) left
    `Pool.terminate` waiting forever for a worker blocked on the task queue's lock, and a worker that reset it itself
    (in its initializer) could still swallow a SIGTERM that came first, as a pass that fails at once sends it."""
    saved = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, signal.SIG_DFL)
    except ValueError:  # not the main thread: its handlers are not ours to change
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def start_worker(processor, layout, plain_end) -> None:
    global _encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a worker is one core
    _encoder = Encoder(processor, layout, plain_end)
    _image_sizes.clear()
    _clip_frames.clear()


def encode_block(block: Block) -> tuple[object, dict]:
    """Read, check and encode a block of samples: its rows as an Arrow record batch (numpy buffers, not Python lists,
    cross the process boundary) and the image files it opened."""
    import pyarrow as pa

    columns = {key: [] for key in FEATURES}
    opened = {}
    for index, conversation in block.conversations():
        check(conversation)
        sizes = []
        for image in conversation.images:
            if isinstance(image, str):
                if image not in _image_sizes:
                    _image_sizes[image] = image_size(image, conversation.id)
                opened[image] = True
                sizes.append(_image_sizes[image])
            else:
                sizes.append(image_size(image, conversation.id))
        row = _encoder(conversation, sizes)
        for clip in conversation.videos:  # opens, and has the frames the model samples (`row` says the model reads clips)
            if clip not in _clip_frames:
                _clip_frames[clip] = clip_frames(clip, conversation.id, _encoder.processor.video_processor.num_frames)
            opened[clip] = True
        columns["id"].append(conversation.id)
        columns["source_index"].append(index)
        columns["images"].append([image if isinstance(image, str) else "" for image in conversation.images])
        columns["videos"].append(conversation.videos)
        for key in ("text", "add_special_tokens", "instruction", "ids", "targets", "image_tokens", "video_tokens",
                    "length"):
            columns[key].append(row[key])
    schema = features().arrow_schema
    arrays = [list_array(columns[name], schema.field(name).type) if name in ("ids", "targets")
              else pa.array(columns[name], type=schema.field(name).type) for name in FEATURES]
    return pa.RecordBatch.from_arrays(arrays, schema=schema), opened


def list_array(rows: list, arrow_type):
    """A list column from each row's numpy array: one concatenation, no Python element."""
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0, dtype=arrow_type.value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=arrow_type.value_type))


def in_memory_images(dataset) -> bool:
    """Whether the samples' images live in the data's own rows (a TRL dataset with images in it), not in files."""
    images = dataset[0]["images"] if len(dataset) else []
    return any(image == "" for image in images)
