"""The training data path at scale: `vlm-fusion train` to its first step, against LLaVA's lazy loader; and clips.

    python benchmarks/data.py                                        # 20K, 80K, 665K samples; 1 and 2 processes
    python benchmarks/data.py --sizes 2000,5000 --processes 1,2      # a quick look (a few minutes on 2 cores)
    python benchmarks/data.py --sizes 100 --processes 1 --skip-webdataset --skip-video   # the test suite's smoke run
    python benchmarks/data.py --skip-images --skip-webdataset --video-clips 300,3000   # the clip rows alone

LLaVA-format data shaped like LLaVA-1.5's mix (`llava_v1_5_mix665k.json`): multi-turn conversations of ~0.9 KB of
text, one image each, `<image>` in the first human turn, the images a pool of a few hundred distinct JPEG files that
many samples share. The model is composed from tiny parts built from configs (random weights): a CLIP-336/14-sized
tower's geometry (336 px, 14 px patches: 576 placeholders per image) with 2 layers 64 wide, and a 2-layer 64-wide
Llama with a byte-level BPE tokenizer — so what is measured is the data path, not the model.

Each measurement is a process of its own (two processes: `accelerate launch` with the shipped `ddp.yaml`) running
`vlm-fusion train --stage instruct --family llava ... --max-steps 1` through a small wrapper that adds a
`TrainerCallback`: every training process reports when its first step begins (`on_step_begin`), its peak resident
memory (`VmHWM`) and CPU time then and at exit. Reported per size and process count:

* **first run**: wall time from launch to the first step (the slowest process), peak RSS per process (the largest);
  `--data-cache DIR` (a fresh folder) when `vlm-fusion train` has that flag;
* **rerun**: the same command again (with the same `--data-cache` folder, now filled);
* **LLaVA lazy (baseline)**: LLaVA's `LazySupervisedDataset` as LLaVA's `train.py` runs it (rewritten here, LLaVA
  is not a dependency): the tower and LM loaded, `json.load` of the whole file, then the first batch's samples
  read and tokenised lazily (its `__getitem__`: image opened, padded to a square and processed; `preprocess_v1` with
  the Vicuna-v1 template and `tokenizer_image_token`) and collated — one process per rank, all at once;
* the data pass of ours: time (and CPU time, all processes) to the first step minus that of a run on 64 samples.

Goals of issue 30 as pass/fail columns: a rerun reaches its first step in under 10 s; peak RSS per process within
0.5 GB of the smallest size's; with `--before data.json` (this benchmark's output on the code before the change)
the first run's data pass at least 3x faster per core (its CPU seconds, all processes). A WebDataset row:
samples/s of `--stage align` streaming img2dataset-layout tar shards (`--data 'shards/{00000..000NN}.tar'`) against
the same caption samples as LLaVA JSON, or "streaming: not available" when `--data` does not take a shard pattern.

Clips (issue 40; `--skip-video` leaves them out, `--skip-images` the image rows): LLaVA-Video-178K's layout
(`{"id", "video", "conversations"}`, `<image>` marking the clip as LLaVA-NeXT's video data write it; the
conversations the image rows'), `--video-clips` samples over a pool of 64 distinct H.264 MP4 files (336x252, 10 s at
24 fps: 240 frames, decoded up to the last sampled one), trained on for `--video-steps` steps of `--stage instruct`
with `--num-frames 8` and `--workers` data loader workers per process, 1 and 2 processes, each run from a fresh data
cache. The tower keeps the image rows' 336 px and image processor, so that decoding and processing 8 frames is the
work it is at LLaVA-Video's geometry, but with 42 px patches (64 a frame, LLaVA-Video's bilinear pooling to 16 and a
newline: 129 placeholders a clip), so that the model's step stays below the data's and the rate is the data path's;
each training process gets `OMP_NUM_THREADS` = cores / processes - workers (at least 1). Reported: clips/s over steps
2..K (as the WebDataset row's samples/s), the share of that time rank 0 waited for its batch (near 0: the model set
the rate), peak RSS of the training processes and of their largest ended child (a data loader worker, or the data
pass's), and a pass/fail that both peaks at each count are within 0.5 GB of the smallest count's — memory flat in the
number of clips (clips decoded a batch at a time in the workers, never all held). A streaming clip row: the pool's
clips as WebVid-style shards (`KEY.mp4` + `KEY.txt`, `--clip-shard-size` each) streamed into `--stage align` for
`--video-steps` steps in one process, against the same clip-caption pairs as LLaVA JSON (`--skip-video-stream`).

Writes `<out>/data.md` and `<out>/data.json`; the synthetic data stay in `--work` (reused by the next run).
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE, PATCH_SIZE = 336, 14  # CLIP-L/14-336's geometry: (336 / 14)^2 = 576 placeholders per image
POOL_IMAGES = 256
CLIP_WIDTH, CLIP_HEIGHT = 336, 252  # 4:3 at the tower's width (H.264 via PyAV, yuv420p)
CLIP_FPS, CLIP_SECONDS = 24, 10  # 240 frames a clip: decoded up to the last sampled frame, as transformers decodes
POOL_CLIPS = 64
NUM_FRAMES = 8  # --num-frames: each clip's 8 frames sampled uniformly
CLIP_PATCH_SIZE = 42  # the clip rows' tower: 336 px frames (the data path's work as at 14 px), an 8 x 8 patch grid
VIDEO_BRIDGE = ("video_pooling=bilinear", "video_newline=true")  # LLaVA-Video's (OneVision's): 4 x 4 a frame + 1
FIXED_COST_SAMPLES = 64  # the run whose time to the first step is the fixed cost (imports, model, launch)
DATA_VERSION = "2"  # bump when the synthetic data change, so that old files in --work are rewritten
GOAL_RERUN_S, GOAL_RSS_MB, GOAL_SPEEDUP = 10.0, 512.0, 3.0
REPORT_ENV = "VLM_FUSION_DATA_BENCH_REPORT"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- synthetic data ------------------------------------------------------------------------------------------------
def write_parts(work: str) -> dict:
    """A tiny CLIP tower at 336 px / 14 px patches with its image processor, and a tiny Llama with a byte-level BPE
    tokenizer (`vlm_fusion.tools.tiny`'s parts, at LLaVA-1.5's tower geometry); reused when already there."""
    parts = {"vision": os.path.join(work, "parts", "vision"), "lm": os.path.join(work, "parts", "lm")}
    done = os.path.join(work, "parts", f"done-{DATA_VERSION}")
    if os.path.exists(done):
        return parts
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    from vlm_fusion.tools.tiny import tiny_bpe_tokenizer, tiny_image_processor, tiny_text_config, tiny_vision_config

    shutil.rmtree(os.path.join(work, "parts"), ignore_errors=True)
    torch.manual_seed(0)
    vision = tiny_vision_config("clip", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    CLIPVisionModel(AutoConfig.for_model(**vision)).save_pretrained(parts["vision"])
    tiny_image_processor(IMAGE_SIZE).save_pretrained(parts["vision"])
    tokenizer = tiny_bpe_tokenizer()
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_text_config("llama",
                                                                                  vocab_size=len(tokenizer))))
    lm.save_pretrained(parts["lm"])
    tokenizer.save_pretrained(parts["lm"])
    open(done, "w").close()
    return parts


def write_clip_tower(work: str) -> str:
    """The clip rows' tower: `write_parts`' CLIP at the same 336 px and image processor, with 42 px patches (64 a
    frame, not 576), so that a step's model work on 64 frames stays below the data path's (decoding the clips,
    resizing and normalising their 8 frames at 336 px, handing the batch over from the worker)."""
    folder = os.path.join(work, "parts", "clip-vision")
    done = os.path.join(work, "parts", f"clip-vision-done-{DATA_VERSION}")
    if os.path.exists(done):
        return folder
    import torch
    from transformers import AutoConfig, CLIPVisionModel

    from vlm_fusion.tools.tiny import tiny_image_processor, tiny_vision_config

    torch.manual_seed(0)
    vision = tiny_vision_config("clip", image_size=IMAGE_SIZE, patch_size=CLIP_PATCH_SIZE)
    CLIPVisionModel(AutoConfig.for_model(**vision)).save_pretrained(folder)
    tiny_image_processor(IMAGE_SIZE).save_pretrained(folder)
    open(done, "w").close()
    return folder


def emptied_unless_done(folder: str, done: str) -> bool:
    """Whether `folder` is to be written: not if its `done` marker (written last, by `open(done, "w")`) says an
    earlier run finished it; otherwise the folder is emptied first (a run stopped halfway leaves no partial files)."""
    if os.path.exists(done):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return True


def write_images(work: str) -> str:
    """`POOL_IMAGES` distinct 400x300 JPEG files (a gradient and a few shapes each): what the samples point at."""
    folder = os.path.join(work, "images")
    done = os.path.join(folder, f"done-{DATA_VERSION}")
    if not emptied_unless_done(folder, done):
        return folder
    from PIL import Image, ImageDraw

    for i in range(POOL_IMAGES):
        rng = random.Random(i)
        a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        image = Image.linear_gradient("L").resize((400, 300))
        image = Image.composite(Image.new("RGB", image.size, a), Image.new("RGB", image.size, b), image)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randrange(360), rng.randrange(260)
            box = (x, y, x + rng.randrange(20, 120), y + rng.randrange(20, 120))
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        image.save(os.path.join(folder, image_name(i)), quality=90)
    open(done, "w").close()
    return folder


def image_name(i: int) -> str:
    return f"{i % POOL_IMAGES:05d}.jpg"


def write_clips(work: str) -> str:
    """`POOL_CLIPS` distinct MP4 files (H.264 where PyAV has it, else MPEG-4), `CLIP_SECONDS` s at `CLIP_FPS` fps,
    `CLIP_WIDTH` x `CLIP_HEIGHT`: a drifting gradient, three shapes moving across it and mild sensor noise, so that
    decoding is the work a real clip's is (what the video samples point at)."""
    folder = os.path.join(work, "clips")
    done = os.path.join(folder, f"done-{DATA_VERSION}")
    if not emptied_unless_done(folder, done):
        return folder
    import av
    import numpy as np

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    started = time.perf_counter()
    ramp = np.linspace(0, 1, CLIP_WIDTH, dtype=np.float32)[None, :, None]  # (1, W, 1)
    for i in range(POOL_CLIPS):
        rng = np.random.default_rng(i)
        a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        shapes = [(rng.uniform(0, CLIP_WIDTH), rng.uniform(0, CLIP_HEIGHT), rng.uniform(-6, 6), rng.uniform(-4, 4),
                   int(rng.integers(20, 80)), rng.uniform(0, 255, 3)) for _ in range(3)]  # x, y, dx, dy, side, colour
        with av.open(os.path.join(folder, clip_name(i)), "w") as container:
            stream = container.add_stream(codec, rate=CLIP_FPS)
            stream.width, stream.height, stream.pix_fmt = CLIP_WIDTH, CLIP_HEIGHT, "yuv420p"
            if codec == "libx264":
                stream.options = {"preset": "veryfast"}
            for f in range(CLIP_FPS * CLIP_SECONDS):
                shift = (f / (CLIP_FPS * CLIP_SECONDS) + ramp) % 1.0  # (1, W, 1)
                frame = np.broadcast_to(a + (b - a) * shift, (CLIP_HEIGHT, CLIP_WIDTH, 3)).copy()  # (H, W, 3)
                for x, y, dx, dy, side, colour in shapes:
                    x, y = int(x + dx * f) % CLIP_WIDTH, int(y + dy * f) % CLIP_HEIGHT
                    frame[y: y + side, x: x + side] = colour
                frame += rng.normal(0, 4, frame.shape).astype(np.float32)
                picture = av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(picture):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    open(done, "w").close()
    size = sum(os.path.getsize(os.path.join(folder, clip_name(i))) for i in range(POOL_CLIPS))
    log(f"  wrote {POOL_CLIPS} clips ({codec}, {CLIP_WIDTH}x{CLIP_HEIGHT}, {CLIP_SECONDS} s at {CLIP_FPS} fps) to "
        f"{folder} ({size / 2**20:.0f} MB, {time.perf_counter() - started:.0f} s)")
    return folder


def clip_name(i: int) -> str:
    return f"{i % POOL_CLIPS:05d}.mp4"


def sentences() -> list[str]:
    """A fixed pool of sentences over the tiny tokenizer's words (so that they tokenize as words do), 20 to 200
    characters long."""
    from vlm_fusion.tools.tiny import WORDS

    words = [w for w in WORDS if w.isalpha() and w not in ("USER", "ASSISTANT", "SYSTEM")]
    rng, pool = random.Random(0), []
    for _ in range(4096):
        target, text = rng.randrange(20, 200), []
        while sum(len(w) + 1 for w in text) < target:
            text.append(rng.choice(words))
        pool.append(" ".join(text) + rng.choice([" .", " ?", " !", " ,"]))
    return pool


def text_of(rng, pool, length: int) -> str:
    out = []
    while sum(len(s) + 1 for s in out) < length:
        out.append(rng.choice(pool))
    return " ".join(out)


def conversation(i: int, pool) -> dict:
    """Sample `i` (the same at every size: each file is a prefix of the next): 1 to 4 rounds, ~900 characters of text,
    the image first in the first human turn, as in LLaVA-1.5's mix."""
    rng = random.Random(i)
    rounds = rng.randint(1, 4)
    budget = rng.randint(600, 830)  # whole sentences overshoot it: ~900 characters in all
    turns = []
    for r in range(rounds):
        share = budget // rounds
        question = text_of(rng, pool, max(20, share // 5))
        turns.append({"from": "human", "value": ("<image>\n" if r == 0 else "") + question})
        turns.append({"from": "gpt", "value": text_of(rng, pool, max(20, share - len(question)))})
    return {"id": f"{i:07d}", "image": image_name(i), "conversations": turns}


def video_conversation(i: int, pool) -> dict:
    """Sample `i` of the clip data, as LLaVA-Video-178K writes it: `{"id", "video", "conversations"}`, the clip marked
    `<image>` in the first human turn (LLaVA-NeXT's video data; `vlm-fusion train` reads it as `<video>`), the
    conversation `conversation(i)`'s."""
    return {"id": f"vid{i:07d}", "video": clip_name(i), "conversations": conversation(i, pool)["conversations"]}


def clip_caption_sample(i: int, pool) -> dict:
    """A clip-caption pair (WebVid-style captions, what `--stage align` streams from shards), as LLaVA JSON."""
    return {"id": f"clipcap{i:07d}", "video": clip_name(i), "conversations": [
        {"from": "human", "value": "<video>\nRender a clear and concise summary of the clip."},
        {"from": "gpt", "value": caption(i, pool)}]}


def caption(i: int, pool) -> str:
    return text_of(random.Random(10**9 + i), pool, random.Random(i).randrange(40, 160))


def caption_sample(i: int, pool) -> dict:
    """A LLaVA-pretraining-style image-caption pair (`blip_laion_cc_sbu_558k.json`)."""
    return {"id": f"cap{i:07d}", "image": image_name(i), "conversations": [
        {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
        {"from": "gpt", "value": caption(i, pool)}]}


def write_json(path: str, count: int, make, pool) -> str:
    """`[make(0), ..., make(count - 1)]` as one JSON list, written a sample at a time; reused when already there."""
    done = f"{path}.done-{DATA_VERSION}"
    if os.path.exists(done) and os.path.exists(path):
        return path
    started = time.perf_counter()
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(count):
            f.write(("," if i else "") + json.dumps(make(i, pool)))
        f.write("]")
    os.replace(path + ".tmp", path)
    open(done, "w").close()
    log(f"  wrote {count:,} samples to {path} ({os.path.getsize(path) / 2**20:.0f} MB, "
        f"{time.perf_counter() - started:.0f} s)")
    return path


def write_shards(folder: str, count: int, shard_size: int, media_folder: str, pool, clips: bool = False) -> str:
    """The caption samples as img2dataset writes them: `00000.tar`, ... each holding `KEY.jpg`, `KEY.txt` (the caption)
    and `KEY.json` (its metadata); `clips`: the clip-caption pairs WebVid-style, `KEY.mp4` in place of the image.
    Returns the brace pattern naming them all."""
    shards = (count + shard_size - 1) // shard_size
    pattern = os.path.join(folder, "{00000..%05d}.tar" % (shards - 1))
    done = os.path.join(folder, f"done-{count}-{shard_size}-{DATA_VERSION}")
    if not emptied_unless_done(folder, done):
        return pattern
    import io

    suffix, name_of, size = ("mp4", clip_name, (CLIP_WIDTH, CLIP_HEIGHT)) if clips else ("jpg", image_name, (400, 300))
    media = {}
    for shard in range(shards):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
            for i in range(shard * shard_size, min(count, (shard + 1) * shard_size)):
                key = f"{shard:05d}{i - shard * shard_size:04d}"
                name = name_of(i)
                if name not in media:
                    with open(os.path.join(media_folder, name), "rb") as f:
                        media[name] = f.read()
                text = caption(i, pool)
                meta = {"key": key, "caption": text, "url": f"https://example.com/{name}", "width": size[0],
                        "height": size[1], "status": "success"}
                for member, payload in ((suffix, media[name]), ("txt", text.encode()),
                                        ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
    open(done, "w").close()
    return pattern


# ---- ours: `vlm-fusion train` in a process of its own ---------------------------------------------------------------
PROBE = '''"""`vlm-fusion train` with a callback that reports each training process's first step, peak RSS and CPU time
(written by benchmarks/data.py; run as a script, or by `accelerate launch` in each process)."""
import atexit, json, os, resource, sys, time

REPORT = os.environ["%(env)s"]
RANK = int(os.environ.get("RANK", "0"))


def peak_mb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(event, **fields):
    """One line for the benchmark: CPU time of this process and of its children that have ended (a data pass's
    worker processes), and the largest peak RSS among those children."""
    usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(REPORT, "a") as f:
        f.write(json.dumps({"event": event, "rank": RANK, "pid": os.getpid(), "t": time.time(), "peak_mb": peak_mb(),
                            "cpu_s": usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime,
                            "children_peak_mb": children.ru_maxrss / 1024, **fields}) + "\\n")


emit("start")
atexit.register(emit, "exit")

import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402


def add_probe(trainer_module):
    """Every Trainer the recipe builds (FusionTrainer or another) gets the probe callback."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        begun = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.begun:
                self.begun = True
                emit("first_step", step=state.global_step)
            else:  # the time since the last step's end: waiting for the batch
                emit("step_begin", step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            emit("step_end", step=state.global_step)

    original = trainer_module.Trainer.__init__

    def with_probe(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Probe())

    trainer_module.Trainer.__init__ = with_probe


class WhenTrainerLoads(importlib.abc.MetaPathFinder):
    """Patches `transformers.trainer` when the command imports it, not before: importing it here would import what
    the command itself may leave out (bitsandbytes, through peft)."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            add_probe(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, WhenTrainerLoads())
from vlm_fusion_cli import main  # noqa: E402

sys.argv = ["vlm-fusion", "train", *sys.argv[1:]]  # as the `vlm-fusion` command runs it
sys.exit(main())
''' % {"env": REPORT_ENV}


def ddp_config() -> str:
    import importlib.util

    package = importlib.util.find_spec("vlm_fusion").submodule_search_locations[0]  # without importing it
    return os.path.join(package, "training", "accelerate", "ddp.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_process(name: str, command: list[str], work: str, env: dict | None = None, timeout: float | None = None,
                quiet: bool = False) -> dict:
    """Run `command`, its output to `<work>/logs/<name>.{out,err}`; wall time, CPU time of the whole process tree
    (waited-for descendants), return code and stderr tail. Prints a line every minute it runs."""
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    cpu, started = children_cpu_s(), time.time()
    with open(os.path.join(logs, f"{name}.out"), "w") as out, open(os.path.join(logs, f"{name}.err"), "w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=work)
        while True:
            try:
                process.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                if timeout and time.time() - started > timeout:
                    process.kill()
                    process.wait()
                    break
                if not quiet:
                    log(f"    {name}: still running ({time.time() - started:.0f} s)")
    wall = time.time() - started
    with open(os.path.join(logs, f"{name}.err"), errors="replace") as f:
        tail = error_tail(f.read())
    with open(os.path.join(logs, f"{name}.out"), errors="replace") as f:
        stdout = f.read()
    result = {"launched": started, "wall_s": wall, "cpu_s": children_cpu_s() - cpu, "returncode": process.returncode,
              "stderr_tail": tail, "stdout": stdout}
    if process.returncode and not quiet:
        log(f"    {name} FAILED (exit {process.returncode}); the end of its stderr:\n{indent(tail)}")
    return result


def error_tail(stderr: str, lines: int = 40) -> str:
    """The end of a failed run's stderr; for a launch through accelerate, the end of the ranks' own tracebacks
    (`[rank0]: ...`), not torchrun's report that follows them."""
    text = stderr.replace("\r", "\n").splitlines()
    ranks = [i for i, line in enumerate(text) if line.startswith("[rank")]
    end = ranks[-1] + 1 if ranks else len(text)
    return "\n".join(line[:300] for line in text[max(0, end - lines):end])


def indent(text: str) -> str:
    return "\n".join("      | " + line for line in text.rstrip().splitlines()[-40:])


def train_command(args, probe: str, processes: int, train_args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, probe, *train_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ddp_config(), "--num_processes",
            str(processes), "--main_process_port", str(free_port()), probe, *train_args]


def run_ours(args, name: str, processes: int, train_args: list[str], cache: str, fresh: bool,
             quiet: bool = False, env: dict | None = None) -> dict:
    """One `vlm-fusion train` launch; time from launch to the first step of its slowest process, the largest peak
    RSS of its training processes, CPU time of all of them, and (rank 0) each step's end. `cache`: the data cache
    folder (`--data-cache` when the flag exists, and `$VLM_FUSION_DATA_CACHE` in any case, so that nothing is
    cached outside the work folder), emptied first when `fresh`; `env`: more environment variables."""
    report = os.path.join(args.work, "logs", f"{name}.jsonl")
    os.makedirs(os.path.dirname(report), exist_ok=True)
    if os.path.exists(report):
        os.remove(report)
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    train_args = train_args + (["--data-cache", cache] if args.cache_flag else [])
    done = run_process(name, train_command(args, args.probe, processes, train_args), args.work,
                       env={REPORT_ENV: report, "VLM_FUSION_DATA_CACHE": cache, **(env or {})}, timeout=args.timeout,
                       quiet=quiet)
    events = []
    if os.path.exists(report):
        with open(report) as f:
            events = [json.loads(line) for line in f if line.strip()]
    first = [e for e in events if e["event"] == "first_step"]
    result = {"returncode": done["returncode"], "wall_s": done["wall_s"], "cpu_s": done["cpu_s"],
              "processes": len({e["pid"] for e in events if e["event"] == "start"})}
    if done["returncode"] or len(first) < processes:
        result["error"] = done["stderr_tail"] or f"exit {done['returncode']}, no first step reported"
        if not done["returncode"] and not quiet:
            log(f"    {name}: exited 0 but {len(first)} of {processes} processes reported a first step")
        return result
    result["first_step_s"] = max(e["t"] for e in first) - done["launched"]
    result["peak_mb"] = max(e["peak_mb"] for e in events)  # VmHWM only grows: the last report of each is its peak
    result["peak_mb_at_first_step"] = max(e["peak_mb"] for e in first)
    result["cpu_s_at_first_step"] = sum(e["cpu_s"] for e in first)
    result["children_peak_mb"] = max(e["children_peak_mb"] for e in events)  # ended child processes (data workers)
    result["step_ends"] = [e["t"] - done["launched"] for e in events if e["event"] == "step_end" and e["rank"] == 0]
    result["step_begins"] = [e["t"] - done["launched"] for e in events if e["event"] == "step_begin" and
                             e["rank"] == 0]  # steps 2..K
    return result


def instruct_args(args, data: str, out: str, steps: int = 1, image_folder: str | None = None,
                  tower: str | None = None) -> list[str]:
    return ["--stage", "instruct", "--family", "llava", "--vision-tower", tower or args.parts["vision"],
               "--language-model", args.parts["lm"], "--data", data, "--image-folder", image_folder or args.images,
               "--output-dir", out, "--max-steps", str(steps), "--overwrite", "--batch-size", str(args.batch_size),
               "--logging-steps", str(steps), "--bridge", "projector_type=mlp2x_gelu"]


def clip_args(args) -> list[str]:
    """What a run on clips adds: a model composed to read them (`--num-frames`, LLaVA-Video's pooling) and the data
    loader's worker processes, where the clips are decoded batch by batch."""
    return ["--num-frames", str(NUM_FRAMES), "--workers", str(args.workers),
            *[a for field in VIDEO_BRIDGE for a in ("--bridge", field)]]


def clip_threads(args, processes: int) -> dict:
    """`OMP_NUM_THREADS` for a run on clips: the cores left to each training process once its data loader workers
    have theirs (at least 1), as `accelerate launch` gives each of several processes 1. Left at torch's default (one
    thread per core), one process's threads and its worker contend for the cores and the step, not the data, sets
    the rate (here: 1.9 clips/s against 4.6 with 1 thread, one process, 2 cores)."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes - args.workers))}


def has_train_flag(flag: str) -> bool:
    """Whether `vlm-fusion train --help` lists `flag`. The process imports what a training process imports first,
    so that the first measured run does not pay for a cold file cache."""
    done = subprocess.run([sys.executable, "-c", "import sys, torch, transformers, accelerate, vlm_fusion.training."
                                                 "trainer; from vlm_fusion_cli import main; "
                                                 "sys.exit(main(['train', '--help']))"],
                          capture_output=True, text=True)
    if done.returncode:
        log(f"    `vlm-fusion train --help` FAILED (exit {done.returncode}):\n{indent(done.stderr)}")
    return flag in done.stdout


# ---- the baseline: LLaVA's LazySupervisedDataset -------------------------------------------------------------------
VICUNA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the human's questions.")
IGNORE_INDEX, IMAGE_TOKEN_INDEX = -100, -200


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """LLaVA's `mm_utils.tokenizer_image_token`: each chunk between `<image>`s tokenized alone, BOS kept once."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [x for sub in zip(chunks, [[image_token_index] * (offset + 1)] * len(chunks)) for x in sub][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def vicuna_v1_prompt(source) -> str:
    """LLaVA's `conv_vicuna_v1.get_prompt()` (SeparatorStyle.TWO, sep " ", sep2 "</s>") of one conversation."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if roles[source[0]["from"]] != "USER":
        source = source[1:]
    seps, text = [" ", "</s>"], VICUNA_V1_SYSTEM + " "
    for j, sentence in enumerate(source):
        text += roles[sentence["from"]] + ": " + sentence["value"] + seps[j % 2]
    return text


def preprocess_v1(sources, tokenizer, has_image: bool):
    """LLaVA's `preprocess_v1`: the Vicuna-v1 prompt, tokenized, the human turns masked round by round."""
    import torch

    conversations = [vicuna_v1_prompt(source) for source in sources]
    if has_image:
        input_ids = torch.stack([torch.tensor(tokenizer_image_token(p, tokenizer)) for p in conversations])
    else:
        input_ids = tokenizer(conversations, return_tensors="pt", padding="longest",
                              max_length=tokenizer.model_max_length, truncation=True).input_ids
    targets, mismatches = input_ids.clone(), 0
    sep = " " + "ASSISTANT" + ": "
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())
        cur_len = 1
        target[:cur_len] = IGNORE_INDEX
        for rou in conversation.split("</s>"):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            if has_image:
                round_len = len(tokenizer_image_token(rou, tokenizer))
                instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
            else:
                round_len = len(tokenizer(rou).input_ids)
                instruction_len = len(tokenizer(parts[0]).input_ids) - 2
            target[cur_len: cur_len + instruction_len] = IGNORE_INDEX
            cur_len += round_len
        target[cur_len:] = IGNORE_INDEX
        if cur_len < tokenizer.model_max_length and cur_len != total_len:
            target[:] = IGNORE_INDEX  # LLaVA prints "WARNING: tokenization mismatch" and ignores the sample
            mismatches += 1
    return {"input_ids": input_ids, "labels": targets, "mismatches": mismatches}


def baseline_child(data_path: str, image_folder: str, vision: str, lm: str, batch: int, rank: int, world: int,
                   launched: float) -> None:
    """What LLaVA's `train.py` does before its first step, data-wise: load the tower, LM, tokenizer and image
    processor; `LazySupervisedDataset.__init__` (`json.load` of the whole file); the sampler's first batch for this
    rank (a seeded permutation, every `world`-th index, as `DistributedSampler`); `__getitem__` of each (LLaVA-1.5's
    `image_aspect_ratio pad`) and `DataCollatorForSupervisedDataset`. Prints one JSON line."""
    import copy
    import resource

    import torch
    import transformers
    from PIL import Image

    tokenizer = transformers.AutoTokenizer.from_pretrained(lm, model_max_length=2048, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA's v1 setting
    transformers.AutoModelForCausalLM.from_pretrained(lm)
    transformers.CLIPVisionModel.from_pretrained(vision)
    processor = transformers.AutoImageProcessor.from_pretrained(vision)
    loaded = time.time()
    list_data_dict = json.load(open(data_path, "r"))
    json_loaded = time.time()

    def expand2square(pil_img, background_color):
        width, height = pil_img.size
        if width == height:
            return pil_img
        size = max(width, height)
        result = Image.new(pil_img.mode, (size, size), background_color)
        result.paste(pil_img, ((size - width) // 2, (size - height) // 2))
        return result

    def getitem(i):
        sources = [list_data_dict[i]]
        image = None
        if "image" in sources[0]:
            image = Image.open(os.path.join(image_folder, list_data_dict[i]["image"])).convert("RGB")
            image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
            image = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
            sources = copy.deepcopy([e["conversations"] for e in sources])
            for source in sources:  # preprocess_multimodal
                for sentence in source:
                    if "<image>" in sentence["value"]:
                        sentence["value"] = ("<image>\n" + sentence["value"].replace("<image>", "").strip()).strip()
        else:
            sources = copy.deepcopy([e["conversations"] for e in sources])
        data_dict = preprocess_v1(sources, tokenizer, has_image=image is not None)
        return {"input_ids": data_dict["input_ids"][0], "labels": data_dict["labels"][0], "image": image,
                "mismatches": data_dict["mismatches"]}

    generator = torch.Generator()
    generator.manual_seed(0)
    indices = torch.randperm(len(list_data_dict), generator=generator).tolist()[rank::world][:batch]
    instances = [getitem(i) for i in indices]
    input_ids = torch.nn.utils.rnn.pad_sequence([x["input_ids"] for x in instances], batch_first=True,
                                                padding_value=tokenizer.pad_token_id)
    labels = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in instances], batch_first=True,
                                             padding_value=IGNORE_INDEX)
    collated = {"input_ids": input_ids[:, :2048], "labels": labels[:, :2048],
                "attention_mask": input_ids.ne(tokenizer.pad_token_id),
                "images": torch.stack([x["image"] for x in instances])}
    now = time.time()
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"first_batch_s": now - launched, "json_load_s": json_loaded - loaded, "peak_mb": peak,
                      "cpu_s": usage.ru_utime + usage.ru_stime, "batch": list(collated["input_ids"].shape),
                      "mismatches": sum(x["mismatches"] for x in instances)}))


def run_baseline(args, name: str, data: str, processes: int) -> dict:
    """One baseline process per rank, started together; the slowest one's time to its first batch, the largest
    peak RSS."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('vlm_fusion_data_benchmark', "
            "sys.argv[1]); bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench); "
            "bench.baseline_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), "
            "int(sys.argv[7]), int(sys.argv[8]), float(sys.argv[9]))")
    logs = os.path.join(args.work, "logs")
    cpu, launched = children_cpu_s(), time.time()
    running = []
    for rank in range(processes):
        out = open(os.path.join(logs, f"{name}-rank{rank}.out"), "w")
        err = open(os.path.join(logs, f"{name}-rank{rank}.err"), "w")
        command = [sys.executable, "-c", code, os.path.abspath(__file__), data, args.images, args.parts["vision"],
                   args.parts["lm"], str(args.batch_size), str(rank), str(processes), repr(launched)]
        running.append((subprocess.Popen(command, stdout=out, stderr=err, cwd=args.work), out, err))
    results, errors = [], []
    for rank, (process, out, err) in enumerate(running):
        process.wait()
        out.close()
        err.close()
        with open(err.name, errors="replace") as f:
            tail = error_tail(f.read())
        with open(out.name) as f:
            lines = f.read().strip().splitlines()
        if process.returncode or not lines:
            errors.append(f"rank {rank}: exit {process.returncode}\n{tail}")
            log(f"    {name} rank {rank} FAILED (exit {process.returncode}); the end of its stderr:\n{indent(tail)}")
        else:
            results.append(json.loads(lines[-1]))
    result = {"wall_s": time.time() - launched, "cpu_s": children_cpu_s() - cpu}
    if errors:
        return {**result, "error": "\n".join(errors)}
    return {**result, "first_step_s": max(r["first_batch_s"] for r in results),
            "json_load_s": max(r["json_load_s"] for r in results), "peak_mb": max(r["peak_mb"] for r in results),
            "cpu_s_at_first_step": sum(r["cpu_s"] for r in results),
            "mismatches": sum(r["mismatches"] for r in results)}


# ---- the WebDataset row --------------------------------------------------------------------------------------------
def align_args(args, data: str, out: str, steps: int, image_folder: str | None,
               tower: str | None = None) -> list[str]:
    command = ["--stage", "align", "--family", "llava", "--vision-tower", tower or args.parts["vision"],
               "--language-model", args.parts["lm"], "--data", data, "--output-dir", out, "--max-steps", str(steps),
               "--overwrite", "--batch-size", str(args.batch_size), "--logging-steps", str(steps),
               "--bridge", "projector_type=mlp2x_gelu"]
    return command + (["--image-folder", image_folder] if image_folder else [])


def samples_per_s(result: dict, args, processes: int = 1) -> float | None:
    """Samples/s over steps 2..K: (K - 1) x global batch / (end of step K - end of step 1)."""
    ends = result.get("step_ends") or []
    if len(ends) < 2 or ends[-1] <= ends[0]:
        return None
    return (len(ends) - 1) * args.batch_size * processes / (ends[-1] - ends[0])


def waiting_share(result: dict) -> float | None:
    """The share of steps 2..K that rank 0 spent waiting for its batch (from a step's end to the next one's begin:
    the Trainer takes the batch in between): near 0, the data keep up and the rate is the model's; near 1, the rate
    is the data path's."""
    ends, begins = result.get("step_ends") or [], result.get("step_begins") or []
    if len(ends) < 2 or len(begins) < len(ends) - 1 or ends[-1] <= ends[0]:
        return None
    return sum(begin - end for begin, end in zip(begins, ends)) / (ends[-1] - ends[0])


def webdataset_row(args, pool, clips: bool = False) -> dict:
    """Shards against the same caption samples as LLaVA JSON, each streamed into `--stage align` for some steps in
    one process: image-caption pairs (img2dataset's layout), or with `clips` clip-caption pairs (WebVid's, `KEY.mp4`)
    into a model that reads clips."""
    kind = "webdataset-clips" if clips else "webdataset"
    n = args.video_stream_samples if clips else args.webdataset_samples
    shard_size = args.clip_shard_size if clips else args.shard_size
    steps = args.video_steps if clips else args.webdataset_steps
    media = args.clips if clips else args.images
    folder = os.path.join(args.work, kind)
    os.makedirs(folder, exist_ok=True)
    what = "clip-caption pairs" if clips else "caption samples"
    log(f"WebDataset: {n:,} {what} as tar shards of {shard_size} and as LLaVA JSON ...")
    captions = write_json(os.path.join(folder, f"captions-{n}.json"), n, clip_caption_sample if clips else
                          caption_sample, pool)
    shards = write_shards(os.path.join(folder, f"shards-{n}"), n, shard_size, media, pool, clips)
    probe_shards = write_shards(os.path.join(folder, "shards-probe"), 16, 8, media, pool, clips)
    out, cache = os.path.join(args.work, "runs", kind), os.path.join(folder, "cache")

    def align(data: str, steps: int, image_folder: str | None) -> list[str]:
        if clips:
            return align_args(args, data, out, steps, image_folder, args.clip_tower) + clip_args(args)
        return align_args(args, data, out, steps, image_folder)

    log("  does --data take a shard pattern? (a 1-step run on 2 shards of 8)")
    env = clip_threads(args, 1) if clips else None
    probe = run_ours(args, f"{kind}-probe", 1, align(probe_shards, 1, None), cache, fresh=True, quiet=True, env=env)
    row = {"samples": n, "shard_size": shard_size, "steps": steps, "pattern": shards}
    if "error" in probe:
        lines = [line for line in probe["error"].strip().splitlines() if line.strip()]
        row["available"] = False
        row["reason"] = lines[-1] if lines else "failed"
        log(f"  streaming: not available ({row['reason']})")
        return row
    row["available"] = True
    log(f"  streaming {steps} steps from {shards} ...")
    row["webdataset"] = run_ours(args, f"{kind}-shards", 1, align(shards, steps, None), cache, fresh=True, env=env)
    log(f"  the same samples from LLaVA JSON ({captions}) ...")
    row["json"] = run_ours(args, f"{kind}-json", 1, align(captions, steps, media), cache, fresh=True, env=env)
    for side in ("webdataset", "json"):
        row[side]["samples_per_s"] = samples_per_s(row[side], args)
        row[side]["waiting_share"] = waiting_share(row[side])
    if row["webdataset"]["samples_per_s"] and row["json"]["samples_per_s"]:
        row["ratio"] = row["webdataset"]["samples_per_s"] / row["json"]["samples_per_s"]
    return row


# ---- the video rows ------------------------------------------------------------------------------------------------
def video_rows(args, pool) -> list[dict]:
    """LLaVA-Video-178K-style clip data (`video_conversation`) of each `--video-clips` count, trained on for
    `--video-steps` steps of `--stage instruct` with `--num-frames 8` in 1 and 2 processes, each run from a fresh data
    cache: time to the first step, clips/s over the steps after the first, peak RSS of the training processes and of
    their ended children (the data loader's workers, the data pass's)."""
    rows = []
    for count in sorted(set(args.video_clips)):
        log(f"{count:,} clip samples ...")
        data = write_json(os.path.join(args.work, f"videos-{count}.json"), count, video_conversation, pool)
        for processes in sorted(set(args.processes)):
            name = f"video-{count}-p{processes}"
            out = os.path.join(args.work, "runs", name)
            log(f"  {processes} process(es), {args.video_steps} steps ...")
            command = instruct_args(args, data, out, args.video_steps, args.clips, args.clip_tower) + clip_args(args)
            run = run_ours(args, name, processes, command, os.path.join(args.work, f"cache-video-{count}"), fresh=True,
                           env=clip_threads(args, processes))
            run["samples_per_s"] = samples_per_s(run, args, processes)
            run["waiting_share"] = waiting_share(run)
            log(f"    {fmt(run.get('first_step_s'))} s to the first step, {fmt(run['samples_per_s'], '.2f')} clips/s, "
                f"peak {fmt(run.get('peak_mb'), '.0f')} MB per process (a worker: "
                f"{fmt(run.get('children_peak_mb'), '.0f')} MB)")
            shutil.rmtree(out, ignore_errors=True)
            rows.append({"clips": count, "processes": processes, "run": run})
    return rows


def assess_video(rows: list[dict]) -> None:
    """Peak RSS against the smallest clip count's, same process count, in place: of a training process, and of any
    process of the run (a data worker included) — flat in the number of clips means both within `GOAL_RSS_MB`."""
    smallest = min(r["clips"] for r in rows)
    for row in rows:
        run = row["run"]
        reference = next(r["run"] for r in rows if r["clips"] == smallest and r["processes"] == row["processes"])
        if "peak_mb" not in run or "peak_mb" not in reference:
            continue
        run["rss_over_smallest_mb"] = run["peak_mb"] - reference["peak_mb"]
        run["any_rss_over_smallest_mb"] = (max(run["peak_mb"], run["children_peak_mb"]) -
                                           max(reference["peak_mb"], reference["children_peak_mb"]))
        run["goal_rss_flat"] = max(run["rss_over_smallest_mb"], run["any_rss_over_smallest_mb"]) <= GOAL_RSS_MB


# ---- the table -----------------------------------------------------------------------------------------------------
def fmt(value, spec=".1f", missing="—") -> str:
    return missing if value is None else format(value, spec)


def goal(ok) -> str:
    return "—" if ok is None else ("pass" if ok else "FAIL")


def assess(rows: list[dict], before: dict | None) -> None:
    """Ratios against the baseline and the issue's goals, in place."""
    smallest = min(r["size"] for r in rows)
    for row in rows:
        base = row["baseline"]
        for kind in ("first", "rerun"):
            ours = row[kind]
            if "first_step_s" not in ours:
                continue
            if "first_step_s" in base:
                ours["time_x_baseline"] = ours["first_step_s"] / base["first_step_s"]
                ours["cpu_x_baseline"] = ours["cpu_s_at_first_step"] / base["cpu_s_at_first_step"]
                ours["rss_x_baseline"] = ours["peak_mb"] / base["peak_mb"]
            reference = next((r[kind] for r in rows if r["size"] == smallest and r["processes"] == row["processes"]),
                             {})
            if "peak_mb" in reference:
                ours["rss_over_smallest_mb"] = ours["peak_mb"] - reference["peak_mb"]
                ours["goal_rss_flat"] = ours["rss_over_smallest_mb"] <= GOAL_RSS_MB
            if kind == "rerun":
                ours["goal_rerun_10s"] = ours["first_step_s"] < GOAL_RERUN_S
        fixed = row.get("fixed") or {}
        first = row["first"]
        if "first_step_s" in first and "first_step_s" in fixed:
            first["data_pass_s"] = first["first_step_s"] - fixed["first_step_s"]
            first["data_pass_cpu_s"] = first["cpu_s_at_first_step"] - fixed["cpu_s_at_first_step"]
        if before and "data_pass_cpu_s" in first:
            old = next((r["first"] for r in before["rows"] if r["size"] == row["size"]
                        and r["processes"] == row["processes"]), {})
            if old.get("data_pass_cpu_s"):
                first["speedup_vs_before"] = old["data_pass_cpu_s"] / max(first["data_pass_cpu_s"], 1e-9)
                first["goal_3x"] = first["speedup_vs_before"] >= GOAL_SPEEDUP


def report(args, rows: list[dict], web: dict | None, video: list[dict] | None, clip_web: dict | None,
           notes: list[str]) -> str:
    lines = []
    if rows:
        lines += image_table(args, rows)
    if web is not None:
        lines += webdataset_table(web, "caption samples", f"tar shards ({web['shard_size']} samples each)",
                                  "LLaVA JSON + image folder", "samples/s")
    if video:
        lines += video_table(args, video)
    if clip_web is not None:
        lines += webdataset_table(clip_web, f"clip-caption pairs, `--num-frames {NUM_FRAMES}`",
                                  f"tar shards of `KEY.mp4` ({clip_web['shard_size']} clips each)",
                                  "LLaVA JSON + clip folder", "clips/s")
    if not lines:
        lines = ["# Training data path: nothing measured", ""]
    elif not rows:  # the image rows left out
        lines = [f"# Training data path: `vlm-fusion train` ({os.cpu_count()} CPUs, batch {args.batch_size} per "
                 "process)"] + lines
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def image_table(args, rows: list[dict]) -> list[str]:
    smallest = min(r["size"] for r in rows)
    lines = [f"# Training data path: `vlm-fusion train` to its first step vs LLaVA's lazy loader ({os.cpu_count()} "
             f"CPUs, batch {args.batch_size} per process)", ""]
    header = ["samples", "processes", "run", "to first step s", "x baseline", "CPU s to first step", "x baseline",
              "peak RSS/process MB", "x baseline",
              "data pass s (CPU s)", f"rerun < {GOAL_RERUN_S:g} s", f"RSS within 0.5 GB of {smallest:,}"]
    if args.before_data:
        header.append(f"data pass >= {GOAL_SPEEDUP:g}x faster per core than before")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        for kind, label in (("first", "first run"), ("rerun", "rerun"), ("baseline", "LLaVA lazy (baseline)")):
            r = row[kind]
            cells = [f"{row['size']:,}", str(row["processes"]), label]
            if "first_step_s" not in r:
                cells += ["failed"] + ["—"] * (len(header) - 4)
            else:
                data_pass = "—" if "data_pass_s" not in r else f"{r['data_pass_s']:.1f} ({r['data_pass_cpu_s']:.1f})"
                if kind == "baseline":
                    data_pass = f"json.load {r['json_load_s']:.1f}"
                peak = f"{r['peak_mb']:.0f}"
                if r.get("children_peak_mb", 0) > r["peak_mb"]:  # a data worker held more than a training process
                    peak += f" (a data worker: {r['children_peak_mb']:.0f})"
                cells += [f"{r['first_step_s']:.1f}", fmt(r.get("time_x_baseline"), ".2f"),
                          f"{r['cpu_s_at_first_step']:.1f}", fmt(r.get("cpu_x_baseline"), ".2f"), peak,
                          fmt(r.get("rss_x_baseline"), ".2f"), data_pass, goal(r.get("goal_rerun_10s")),
                          goal(r.get("goal_rss_flat")) + ("" if "rss_over_smallest_mb" not in r or row["size"] ==
                                                          smallest else f" ({r['rss_over_smallest_mb']:+.0f} MB)")]
                if args.before_data:
                    cells.append("—" if "speedup_vs_before" not in r else
                                 f"{goal(r['goal_3x'])} ({r['speedup_vs_before']:.2f}x)")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def webdataset_table(web: dict, what: str, shards: str, json_label: str, unit: str) -> list[str]:
    lines = ["", f"## WebDataset: `--stage align`, {web['samples']:,} {what}, {web['steps']} steps, 1 process", ""]
    if not web.get("available"):
        return lines + [f"streaming: not available (`--data '{os.path.basename(web['pattern'])}'`: {web['reason']})"]
    lines += [f"| source | to first step s | {unit} (steps 2..K) | x JSON | waiting for data | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    for side, label in (("webdataset", shards), ("json", json_label)):
        r = web[side]
        if "first_step_s" not in r:
            lines.append(f"| {label} | failed | — | — | — | — |")
            continue
        ratio = web.get("ratio") if side == "webdataset" else 1.0
        peak = f"{r['peak_mb']:.0f}"
        if r.get("children_peak_mb", 0) > r["peak_mb"]:
            peak += f" (a data worker: {r['children_peak_mb']:.0f})"
        lines.append(f"| {label} | {r['first_step_s']:.1f} | {fmt(r['samples_per_s'], '.2f')} | {fmt(ratio, '.2f')} "
                     f"| {percent(r.get('waiting_share'))} | {peak} |")
    return lines


def percent(share) -> str:
    return "—" if share is None else f"{100 * share:.0f} %"


def video_table(args, rows: list[dict]) -> list[str]:
    smallest = min(r["clips"] for r in rows)
    lines = ["", f"## Clips: `--stage instruct`, LLaVA-Video-178K's layout, `--num-frames {NUM_FRAMES}`, "
                 f"{args.video_steps} steps, `--workers {args.workers}`", "",
             f"| clips | processes | to first step s | clips/s (steps 2..K) | waiting for data | peak RSS/process MB | "
             f"data worker peak MB | RSS within 0.5 GB of {smallest:,} |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["run"]
        cells = [f"{row['clips']:,}", str(row["processes"])]
        if "first_step_s" not in r:
            cells += ["failed"] + ["—"] * 5
        else:
            over = "" if row["clips"] == smallest or "rss_over_smallest_mb" not in r else \
                f" ({r['rss_over_smallest_mb']:+.0f} MB; any process {r['any_rss_over_smallest_mb']:+.0f} MB)"
            cells += [f"{r['first_step_s']:.1f}", fmt(r["samples_per_s"], ".2f"), percent(r.get("waiting_share")),
                      f"{r['peak_mb']:.0f}", f"{r['children_peak_mb']:.0f}", goal(r.get("goal_rss_flat")) + over]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---- main ----------------------------------------------------------------------------------------------------------
def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser.add_argument("--sizes", type=ints, default=[20000, 80000, 665000], help="samples, comma-separated")
    parser.add_argument("--processes", type=ints, default=[1, 2], help="training processes, comma-separated")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="where data.md and data.json go")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "vlm-fusion-data-benchmark"),
                        help="the synthetic data, runs and logs (kept: the data are reused by the next run)")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--skip-webdataset", action="store_true")
    parser.add_argument("--webdataset-samples", type=int, default=4000)
    parser.add_argument("--webdataset-steps", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--skip-images", action="store_true", help="leave out the image rows (--sizes)")
    parser.add_argument("--video-clips", type=ints, default=[500, 2000],
                        help="clip samples (a pool of distinct clips shared), comma-separated")
    parser.add_argument("--video-steps", type=int, default=10, help="steps of each clip run")
    parser.add_argument("--workers", type=int, default=1, help="data loader workers per process, clip runs")
    parser.add_argument("--skip-video", action="store_true", help="leave out the clip rows (the shards' too)")
    parser.add_argument("--skip-video-stream", action="store_true", help="leave out the clip shards row")
    parser.add_argument("--video-stream-samples", type=int, default=400, help="clip-caption pairs in shards")
    parser.add_argument("--clip-shard-size", type=int, default=100, help="clips per tar shard")
    parser.add_argument("--before", dest="before_data", metavar="DATA_JSON",
                        help="this benchmark's data.json from the code before the change: the data pass's speed-up")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds any one run may take")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.work = os.path.abspath(args.work)
    os.makedirs(os.path.join(args.work, "logs"), exist_ok=True)
    before = json.load(open(args.before_data)) if args.before_data else None
    notes = []
    started = time.time()
    log(f"work folder {args.work}: tiny parts (336 px / 14 px tower: 576 placeholders per image), "
        f"{POOL_IMAGES} images ...")
    args.parts = write_parts(args.work)
    args.images = write_images(args.work)
    args.probe = os.path.join(args.work, "probe.py")
    with open(args.probe, "w") as f:
        f.write(PROBE)
    pool = sentences()
    args.cache_flag = has_train_flag("--data-cache")
    if not args.cache_flag:
        notes.append("`vlm-fusion train` has no `--data-cache` flag yet: the rerun is the same command again, "
                     "with nothing cached (first run = rerun).")
        log("note: " + notes[-1])
    sizes = [] if args.skip_images else sorted(set(args.sizes))
    rows, fixed = image_rows(args, sizes, pool) if sizes else ([], {})
    web = None if args.skip_webdataset else webdataset_row(args, pool)
    video, clip_web = None, None
    if not args.skip_video:
        log(f"clips: {POOL_CLIPS} distinct ones ...")
        args.clips, args.clip_tower = write_clips(args.work), write_clip_tower(args.work)
        video = video_rows(args, pool) if args.video_clips else None
        clip_web = None if args.skip_video_stream else webdataset_row(args, pool, clips=True)
    if rows:
        assess(rows, before)
        notes.append("baseline: LLaVA's `LazySupervisedDataset` (json.load of the whole file, then the first batch "
                     "tokenised lazily), the tower and LM loaded first as LLaVA's train.py does; its time is to the "
                     "first batch collated, ours to the first step's start (also after the first batch).")
        fixed_times = ", ".join(f"{p} process(es) {fmt(r.get('first_step_s'))} s" for p, r in fixed.items())
        notes.append(f"data pass: time (CPU time, all processes) to the first step minus that of a run on "
                     f"{FIXED_COST_SAMPLES} samples ({fixed_times}).")
    if video:
        assess_video(video)
    if video or clip_web:
        notes.append(f"clips: {POOL_CLIPS} distinct MP4 files ({CLIP_WIDTH}x{CLIP_HEIGHT}, {CLIP_SECONDS} s at "
                     f"{CLIP_FPS} fps) shared by the samples; {NUM_FRAMES} frames sampled from each, decoded and "
                     f"processed at {IMAGE_SIZE} px in the data loader's workers; the tower {IMAGE_SIZE} px with "
                     f"{CLIP_PATCH_SIZE} px patches and LLaVA-Video's pooling ({', '.join(VIDEO_BRIDGE)}): "
                     f"{NUM_FRAMES} x 16 + 1 placeholders a clip. clips/s: (K - 1) x batch x processes over steps "
                     "2..K; waiting for data: the share of those steps' time rank 0 waited for its batch; a data "
                     "worker's peak: the largest ended child of a training process (the data loader's workers, the "
                     "data pass's); each training process runs torch on the cores its workers leave "
                     "(`OMP_NUM_THREADS` = cores / processes - workers, at least 1).")
    text = report(args, rows, web, video, clip_web, notes)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data.md"), "w") as f:
        f.write(text)
    record = {"sizes": sizes, "processes": sorted(set(args.processes)), "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "data_cache_flag": args.cache_flag, "rows": rows, "webdataset": web,
              "video": video, "video_stream": clip_web, "notes": notes, "elapsed_s": time.time() - started}
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump(record, f, indent=1)
    log(f"wrote {os.path.join(args.out, 'data.md')} and data.json ({time.time() - started:.0f} s)")
    failed = [r for r in rows for k in ("first", "rerun", "baseline") if "error" in r[k]]
    failed += [r for r in video or [] if "error" in r["run"]]
    return 1 if failed else 0


def image_rows(args, sizes: list[int], pool) -> tuple[list[dict], dict]:
    """Each size in each process count: the first run, the rerun and LLaVA's lazy loader; and the fixed cost (a run
    on `FIXED_COST_SAMPLES` samples) per process count."""
    fixed_data = write_json(os.path.join(args.work, f"data-{FIXED_COST_SAMPLES}.json"), FIXED_COST_SAMPLES,
                            conversation, pool)
    fixed = {}
    rows = []
    for processes in sorted(set(args.processes)):
        log(f"{processes} process(es): fixed cost, a run on {FIXED_COST_SAMPLES} samples ...")
        fixed[processes] = run_ours(args, f"fixed-p{processes}", processes,
                                    instruct_args(args, fixed_data, os.path.join(args.work, "runs", "fixed")),
                                    os.path.join(args.work, f"cache-{FIXED_COST_SAMPLES}"), fresh=True)
        log(f"  {fmt(fixed[processes].get('first_step_s'))} s to the first step")
    for size in sizes:
        log(f"{size:,} samples ...")
        data = write_json(os.path.join(args.work, f"data-{size}.json"), size, conversation, pool)
        for processes in sorted(set(args.processes)):
            out = os.path.join(args.work, "runs", f"{size}-p{processes}")
            cache = os.path.join(args.work, f"cache-{size}")
            row = {"size": size, "processes": processes, "data_cache": cache if args.cache_flag else None,
                   "fixed": fixed[processes]}
            for kind in ("first", "rerun"):  # the first run starts with nothing cached; the rerun reuses it
                log(f"  {processes} process(es), {'first run' if kind == 'first' else 'rerun'} ...")
                row[kind] = run_ours(args, f"{kind}-{size}-p{processes}", processes, instruct_args(args, data, out),
                                     cache, fresh=kind == "first")
                log(f"    {fmt(row[kind].get('first_step_s'))} s to the first step, peak "
                    f"{fmt(row[kind].get('peak_mb'), '.0f')} MB per process")
            log(f"  {processes} process(es), LLaVA's lazy loader (baseline) ...")
            row["baseline"] = run_baseline(args, f"baseline-{size}-p{processes}", data, processes)
            log(f"    {fmt(row['baseline'].get('first_step_s'))} s to the first batch, peak "
                f"{fmt(row['baseline'].get('peak_mb'), '.0f')} MB per process")
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
    return rows, fixed


if __name__ == "__main__":
    sys.exit(main())
