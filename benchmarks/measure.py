"""Timing, memory and bandwidth measurements.

`footprint(spec)` loads one model in a process of its own and reports its `from_pretrained` time and the process's
peak resident memory (and peak GPU memory when `spec["device"]` is a GPU) after a prefill; `serve_footprints` forks
those processes from one that has imported torch and transformers and done nothing else, so that those imports are
paid once and not counted as loading (their memory is counted). `compare(specs)` loads the models of one comparison
side by side and times them in alternation (A B, B A, A B, ...), so drift of a shared machine hits both alike;
latencies are medians over `repeats` runs after a warm-up. Decode speed is (K - 1) / (T(K tokens) - T(1 token)):
prefill and the first token do not count.
"""

import json
import os
import resource
import statistics
import sys
import time

import torch



def commit() -> str:
    """The commit a table comes from: the short hash, `+changes` when the tree differs from it ("unknown" outside git)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def load_average() -> str:
    """The machine's 1-minute load average, for a table's header: how busy the machine was besides the benchmark."""
    return f"load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load unknown"


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """This process's resident high-water mark. (`ru_maxrss` would also count the parent's memory at fork.)"""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 7, device: str = "cpu") -> dict:
    """Read bandwidth (a sum over a large buffer) and copy bandwidth (read + write) of `device`'s memory, in GB/s."""
    a = torch.rand(megabytes * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    a.sum(), b.copy_(a)  # warm-up: page in both buffers
    read = a.numel() * 4 / median_time(lambda: a.sum(), repeats)
    copy = 2 * a.numel() * 4 / median_time(lambda: b.copy_(a), repeats)
    return {"read_gbs": read / 1e9, "copy_gbs": copy / 1e9}


def cache_bytes(cache) -> int:
    """Bytes held by a transformers KV cache."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None and t.numel())


def media_cache_bytes(media_cache) -> int:
    """Bytes of a Flamingo-style model's cached latents and per-layer cross-attention keys/values."""
    if media_cache is None:
        return 0
    kv = sum(t.numel() * t.element_size() for pair in media_cache.kv.values() for t in pair)
    return kv + media_cache.media.numel() * media_cache.media.element_size()


def lm_bytes_read_per_token(model) -> int:
    """Weights one decoding step reads: the LM without its input embedding table (one row is looked up)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.language_model.parameters())  # the base decoder
    return total - embedding.numel() * embedding.element_size() + head.numel() * head.element_size()


# ---- loading each implementation -----------------------------------------------------------------------------
def load(spec):
    """(model, inputs, forward, generate) for one implementation; `generate(k)` produces exactly k new tokens."""
    kind, path = spec["kind"], spec["path"]
    if kind == "openflamingo":
        return load_openflamingo(spec)
    if kind == "ours":
        import vlm_fusion  # noqa: F401
        from transformers import AutoModelForImageTextToText as model_cls
        from transformers import AutoProcessor as processor_cls
    elif kind == "hf_llava":
        from transformers import LlavaForConditionalGeneration as model_cls
        from transformers import LlavaProcessor as processor_cls
    elif kind == "hf_blip2":
        from transformers import Blip2ForConditionalGeneration as model_cls
        from transformers import Blip2Processor as processor_cls
    elif kind == "hf_idefics":
        from transformers import IdeficsForVisionText2Text as model_cls
        from transformers import IdeficsProcessor as processor_cls
    elif kind == "hf_llava_onevision":  # its processor needs torchvision: our converted one writes the same inputs
        import vlm_fusion  # noqa: F401
        from transformers import AutoProcessor
        from transformers import LlavaOnevisionForConditionalGeneration as model_cls

        processor_cls = AutoProcessor
        spec = {**spec, "processor_path": spec["inputs_from"]}
    else:
        raise ValueError(kind)
    device = spec_device(spec)
    model = model_cls.from_pretrained(path, device_map=device).eval()
    if "reuse_media_kv" in spec:
        model.reuse_media_kv = spec["reuse_media_kv"]
    processor = processor_cls.from_pretrained(spec.get("processor_path", path))
    if spec.get("num_frames"):  # one clip of that many frames
        inputs = processor(videos=[spec_clip(spec)], text=[spec["prompt"]], do_sample_frames=False,
                           return_tensors="pt").to(device)
    elif isinstance(spec["prompt"], list):  # an IDEFICS sample: [text before the images, text after them]
        sample = [spec["prompt"][0], *spec_images(spec)[0], spec["prompt"][1]]
        inputs = processor(text=[sample], return_tensors="pt").to(device)
    else:
        inputs = processor(images=spec_images(spec), text=[spec["prompt"]], return_tensors="pt").to(device)
    return model, inputs, lambda: model(**inputs, use_cache=True), make_generate(model, inputs, spec)


def make_generate(model, inputs, spec):
    """Greedy generation of exactly k tokens; `spec["static_compile"]`: a static cache and a compiled forward."""
    options = {}
    if spec.get("static_compile"):
        from transformers import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
        options = dict(cache_implementation="static", compile_config=compile_config)

    def generate(k):
        return model.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, **options)
    return generate


def spec_device(spec) -> str:
    return spec.get("device", "cpu")


def spec_clip(spec):
    """A random clip `(num_frames, image_size, image_size, 3)`, uint8, the same for every spec."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (spec["num_frames"], spec["image_size"], spec["image_size"], 3), dtype=np.uint8)


def spec_images(spec):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (spec["image_size"],) * 2 + (3,), dtype=np.uint8))
              for _ in range(spec["num_images"])]
    return [images] if spec.get("nested_images") else images


def load_openflamingo(spec):
    """OpenFlamingo's own `Flamingo` rebuilt from the released-style checkpoint (forward only: its generate does not
    run with transformers 5)."""
    import types

    from transformers import AutoTokenizer

    from vlm_fusion.conversion import convert_openflamingo

    import vlm_fusion  # noqa: F401
    from vlm_fusion import FusionFlamingoProcessor

    args = types.SimpleNamespace(language_model=spec["language_model"], vision_tower=spec["vision_tower"],
                                 dtype=torch.float32, cross_attention_every_n_layers=spec["every_n"])
    tokenizer = AutoTokenizer.from_pretrained(spec["language_model"])
    processor = FusionFlamingoProcessor.from_pretrained(spec["path"])
    config = types.SimpleNamespace(image_token_id=processor.image_token_id,
                                   end_of_chunk_token_id=processor.end_of_chunk_token_id)
    from vlm_fusion.special_tokens import add_flamingo_tokens

    add_flamingo_tokens(tokenizer)
    source = torch.load(spec["checkpoint"], map_location="cpu")
    model = convert_openflamingo.open_flamingo_reference(args, source, config, tokenizer).to(spec_device(spec))
    inputs = processor(images=spec_images(spec), text=[spec["prompt"]], return_tensors="pt").to(spec_device(spec))
    vision_x = inputs["pixel_values"][None, :, None]
    forward = lambda: model(vision_x=vision_x, lang_x=inputs["input_ids"], attention_mask=inputs["attention_mask"],  # noqa: E731
                            use_cache=True)
    return model, inputs, forward, None


FOOTPRINT = "FOOTPRINT "  # marks the line that carries a measurement among whatever else a process prints


def serve_footprints() -> None:
    """Measure each spec read from stdin (a JSON line) in a process forked for it; answer one marked JSON line each.

    This process imports torch and transformers' base and does nothing else (no model, no CUDA context), so that
    each fork starts where a fresh interpreter stands after those imports, without paying for them (~4 s) each time:
    its peak RSS counts from this process's resident size at fork, as a fresh one's would from the same imports.
    """
    import traceback

    import transformers.modeling_utils  # noqa: F401
    import transformers.processing_utils  # noqa: F401

    assert not torch.cuda.is_initialized()  # a CUDA context does not survive a fork
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                answer = {"result": footprint(json.loads(line))}
            except BaseException:
                answer = {"error": traceback.format_exc()}
            print(FOOTPRINT + json.dumps(answer), flush=True)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:  # it died before it could answer
            print(FOOTPRINT + json.dumps({"error": f"the measuring process ended with status {status}"}), flush=True)


@torch.no_grad()
def footprint(spec) -> dict:
    """`from_pretrained` time and peak RSS (after one prefill) of one model; run it in a process of its own."""
    start = time.perf_counter()
    _, _, forward, _ = load(spec)
    load_s = time.perf_counter() - start
    forward()
    result = {"load_s": load_s, "peak_rss_mb": peak_rss_mb()}
    if spec_device(spec).startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


@torch.no_grad()
def compare(specs: dict) -> dict:
    """Prefill latency and decode speed of each named spec, timed in alternation."""
    torch.manual_seed(0)
    loaded = {name: load(spec) for name, spec in specs.items()}
    repeats = max(spec["repeats"] for spec in specs.values())
    k = max(spec.get("new_tokens") or 0 for spec in specs.values())
    times = {name: {"prefill": [], "one": [], "many": []} for name in loaded}
    for _, _, forward, generate in loaded.values():  # warm-up (a static cache compiles once per length: both)
        forward()
        if generate is not None and k:
            generate(1)
            generate(k)
    for round_ in range(repeats):
        order = list(loaded) if round_ % 2 == 0 else list(loaded)[::-1]  # A B, then B A: no order bias
        for name in order:
            _, _, forward, generate = loaded[name]
            times[name]["prefill"].append(median_time(forward, 1))
            if generate is not None and k:
                times[name]["one"].append(median_time(lambda: generate(1), 1))
                times[name]["many"].append(median_time(lambda: generate(k), 1))
    results = {}
    for name, (model, inputs, _, generate) in loaded.items():
        result = {"prefill_s": statistics.median(times[name]["prefill"]),
                  "prompt_tokens": int(inputs["input_ids"].shape[1])}
        if times[name]["many"]:
            decode_s = statistics.median(times[name]["many"]) - statistics.median(times[name]["one"])
            if decode_s > 0:  # otherwise k tokens were too few to time apart from one: no figure, not a huge one
                result["decode_tok_s"] = (k - 1) / decode_s
        if specs[name]["kind"] == "ours":
            result["lm_bytes_per_token"] = lm_bytes_read_per_token(model)
        results[name] = result
    return results


def write_report(out: str, name: str, report: str, rows) -> None:
    """Print a benchmark's markdown `report` and write it, with its `rows` as JSON, to `out/{name}.md|json`."""
    print("\n" + report)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(report)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=2)
