"""vlm-fusion benchmarks, one command:

    python benchmarks/run.py                 # default size, ~10 minutes on a 2-core CPU
    python benchmarks/run.py --size large    # CLIP-L/14-336 + 1.3B LM
    python benchmarks/run.py --size tiny --repeats 1 --new-tokens 3   # the smoke run (scripts/gpu_check.py --dry-run)

1. Each family against the reference implementation on identical weights (converted by our scripts):
   transformers' Llava (also both with a static cache and a compiled forward), LlavaOnevision on a clip, Blip2 and Idefics (which recomputes
   its cross-attention keys/values every step, where ours are cached); for Flamingo, our decoding with cached cross-attention K/V against the same
   model recomputing them every step (OpenFlamingo's behaviour), and OpenFlamingo's own forward.
2. The seeds' trade-off table, measured on one vision tower and one LM for all three families, for images and for
   clips of several frame counts (each family's video path and its knob: pooling, per-frame or video Q-Former, latents).
3. The physical bound: decode tokens/s as a fraction of (measured memory bandwidth / LM bytes read per token).

Tables are printed and written to OUT/tables.md, OUT/results.json and OUT/benchmarks.png.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import measure  # noqa: E402
import setups  # noqa: E402


TABLES = ("reference", "tradeoffs", "video", "bound")


def chosen(name: str, parts) -> bool:
    """`--rows` / `--setups`: whether `name` contains one of `parts` (every name when none are given)."""
    return not parts or any(part.lower() in name.lower() for part in parts)


class Footprints:
    """Load time and peak RSS of one model at a time, each in a process of its own: forked from a helper that has
    imported torch and transformers and nothing else (`measure.serve_footprints`), or a fresh interpreter when a
    forked measurement fails (from then on); in this process with `in_process` (not per model, then)."""

    def __init__(self, in_process: bool):
        self.in_process, self.server, self.log = in_process, None, None

    def __call__(self, spec) -> dict:
        if self.in_process:
            return measure.footprint(spec)
        if self.server is not False:
            answer = self.forked(spec)
            if "result" in answer:
                return answer["result"]
            print(f"  (a forked measurement failed; fresh interpreters measure from now on)\n{answer['error'][-2000:]}",
                  flush=True)
            self.close()
            self.server = False
        return fresh_interpreter(spec)

    def forked(self, spec) -> dict:
        if self.server is None:
            self.log = tempfile.TemporaryFile("w+")
            self.server = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                            "import measure; measure.serve_footprints()", HERE],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        try:
            self.server.stdin.write(json.dumps(spec) + "\n")
            self.server.stdin.flush()
            for line in self.server.stdout:
                if line.startswith(measure.FOOTPRINT):
                    return json.loads(line[len(measure.FOOTPRINT):])
        except BrokenPipeError:  # it had ended already
            pass
        self.log.seek(0)
        return {"error": f"the helper process ended:\n{self.log.read()[-2000:]}"}

    def close(self) -> None:
        if self.server:
            try:
                self.server.stdin.close()
            except BrokenPipeError:
                pass
            self.server.wait()


def fresh_interpreter(spec) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import measure; "
            "print(json.dumps(measure.footprint(json.loads(sys.argv[2]))))")
    done = subprocess.run([sys.executable, "-c", code, HERE, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"loading {spec['kind']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def comparison(family, reference, ref_spec, ours_spec, args):
    """One row: both models timed in alternation in this process, each loaded alone for its footprint. The specs
    go through JSON first, as to the footprint's fresh process, so that both ways of measuring read the same spec."""
    ref_spec, ours_spec = json.loads(json.dumps(ref_spec)), json.loads(json.dumps(ours_spec))
    timed = measure.compare({"ref": ref_spec, "ours": ours_spec})
    ref = {**timed["ref"], **args.footprint(ref_spec)}
    ours = {**timed["ours"], **args.footprint(ours_spec)}
    print(f"  {family} vs {reference}: prefill {ours['prefill_s']:.4f} / {ref['prefill_s']:.4f} s, decode "
          f"{tok_s(ours)} / {tok_s(ref)} tok/s (ours / reference)", flush=True)  # each row as soon as it is measured
    return family, reference, ref, ours


# ---- 1. against the reference implementations -----------------------------------------------------------------
def reference_comparisons(work, size, args):
    common = dict(repeats=args.repeats, new_tokens=args.new_tokens, image_size=size["image_size"], device=args.device)
    rows = []

    def wanted(label: str) -> bool:  # a row is built and timed only when --rows chooses it
        return chosen(label, args.rows)

    print("[1/3] building reference models and converting them ...", flush=True)
    if wanted("LLaVA-style") or wanted("LLaVA-style, static cache + compile"):
        llava_hf, llava_ours = setups.build_llava(work, size)
        one = dict(common, prompt=setups.LLAVA_PROMPT, num_images=1)
        if wanted("LLaVA-style"):
            rows.append(comparison("LLaVA-style", "transformers Llava",
                                   dict(one, kind="hf_llava", path=llava_hf), dict(one, kind="ours", path=llava_ours),
                                   args))
        if wanted("LLaVA-style, static cache + compile"):
            static = dict(one, static_compile=True)
            rows.append(comparison("LLaVA-style, static cache + compile", "transformers Llava, same settings",
                                   dict(static, kind="hf_llava", path=llava_hf),
                                   dict(static, kind="ours", path=llava_ours), args))
    clip = dict(common, prompt=setups.VIDEO_PROMPT, num_frames=size["frames"][0])
    label = f"LLaVA-style, a {clip['num_frames']}-frame clip"
    if wanted(label):
        onevision_hf, onevision_ours = setups.build_llava_onevision(work, size)
        rows.append(comparison(label, "transformers LlavaOnevision",
                               dict(clip, kind="hf_llava_onevision", path=onevision_hf, inputs_from=onevision_ours),
                               dict(clip, kind="ours", path=onevision_ours), args))
    if wanted("BLIP-2-style"):
        blip2_hf, blip2_ours = setups.build_blip2(work, size)
        one = dict(common, prompt=setups.BLIP2_PROMPT, num_images=1)
        rows.append(comparison("BLIP-2-style", "transformers Blip2", dict(one, kind="hf_blip2", path=blip2_hf),
                               dict(one, kind="ours", path=blip2_ours), args))
    if wanted("Flamingo-style, 4 images") and setups.open_flamingo_available():
        flamingo = setups.build_flamingo(work, size)
        four = dict(common, prompt=setups.FLAMINGO_PROMPT, num_images=4, nested_images=True, path=flamingo["ours"])
        cached = dict(four, kind="ours", reuse_media_kv=True)
        rows.append(comparison("Flamingo-style, 4 images", "recomputed K/V", dict(four, kind="ours", reuse_media_kv=False),
                               cached, args))
        openflamingo = dict(four, kind="openflamingo", new_tokens=0, every_n=flamingo["every_n"], **{
            k: flamingo[k] for k in ("checkpoint", "vision_tower", "language_model")})
        rows.append(comparison("Flamingo-style, 4 images", "OpenFlamingo", openflamingo, dict(cached, new_tokens=0),
                               args))
    elif wanted("Flamingo-style, 4 images"):
        print("  (open-flamingo is not installed: the Flamingo rows are skipped)")
    if wanted("Flamingo-style (IDEFICS), 4 images"):
        idefics = setups.build_idefics(work, size)
        four = dict(common, num_images=4, nested_images=True, prompt=setups.IDEFICS_SAMPLE)
        rows.append(comparison("Flamingo-style (IDEFICS), 4 images", "transformers Idefics",
                               dict(four, kind="hf_idefics", path=idefics["reference"]),
                               dict(four, kind="ours", path=idefics["ours"]), args))
    return rows


def tok_s(side) -> str:
    return f"{side['decode_tok_s']:.1f}" if "decode_tok_s" in side else "n/a"


def ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def reference_table(rows):
    lines = ["| family | reference | prefill ours / ref (s) | prefill speed x | decode ours / ref (tok/s) | "
             "decode speed x | peak RSS ours / ref (MB) | load ours / ref (s) |", "|" + "---|" * 8]
    if rows and "peak_gpu_mb" in rows[0][3]:
        lines = [lines[0] + " peak GPU ours / ref (MB) |", "|" + "---|" * 9]
    records = []
    for family, reference, ref, ours in rows:
        record = dict(family=family, reference=reference, ours=ours, ref=ref,
                      prefill_speedup=ratio(ref["prefill_s"], ours["prefill_s"]),
                      decode_speedup=ratio(ours.get("decode_tok_s"), ref.get("decode_tok_s")))
        records.append(record)
        decode = f"{tok_s(ours)} / {tok_s(ref)}" if "decode_tok_s" in ref or "decode_tok_s" in ours else "n/a"
        lines.append(
            f"| {family} | {reference} | {ours['prefill_s']:.3f} / {ref['prefill_s']:.3f} | "
            f"{record['prefill_speedup']:.2f} | {decode} | "
            f"{'%.2f' % record['decode_speedup'] if record['decode_speedup'] else 'n/a'} | "
            f"{ours['peak_rss_mb']:.0f} / {ref['peak_rss_mb']:.0f} | {ours['load_s']:.2f} / {ref['load_s']:.2f} |"
            + (f" {ours['peak_gpu_mb']:.0f} / {ref['peak_gpu_mb']:.0f} |" if "peak_gpu_mb" in ours else ""))
    return "\n".join(lines), records


# ---- 2. the trade-off table ----------------------------------------------------------------------------------------
FAMILY_NAMES = {"fusion_llava": "LLaVA-style", "fusion_blip2": "BLIP-2-style", "fusion_flamingo": "Flamingo-style"}


@torch.no_grad()
def tradeoffs(size, args):
    print("[2/3] trade-offs on one vision tower and one LM ...", flush=True)
    points = [(r, 1) for r in size["resolutions"]] + [(size["image_size"], n) for n in size["image_counts"] if n > 1]
    records = []
    for family in FAMILY_NAMES:
        for resolution in sorted({r for r, _ in points}):
            model, processor = setups.family_model(family, size, resolution)
            model.to(args.device)
            bridge = sum(p.numel() for m in model.bridge_modules().values() for p in m.parameters())
            for _, count in [p for p in points if p[0] == resolution]:
                spec = dict(image_size=resolution, num_images=count, nested_images=family == "fusion_flamingo")
                prompt = "".join(["<image> a circle . "] * count) + "what is shown ?"
                inputs = processor(images=measure.spec_images(spec), text=[prompt], return_tensors="pt").to(args.device)
                out = model(**inputs, use_cache=True)
                prefill = measure.median_time(lambda: model(**inputs, use_cache=True), max(1, args.repeats // 2 + 1))
                records.append(dict(
                    family=FAMILY_NAMES[family], resolution=resolution, images=count, bridge_params=bridge,
                    tokens_per_image=model.config.num_image_tokens(), prompt_tokens=int(inputs["input_ids"].shape[1]),
                    prefill_s=prefill, kv_cache_bytes=measure.cache_bytes(out.cache),
                    media_cache_bytes=measure.media_cache_bytes(getattr(out, "media_cache", None)),
                ))
    lines = ["| family | px | images | bridge params | LM tokens / image | prompt tokens | prefill (s) | "
             "KV cache (MB) | cached media K/V (MB) |", "|" + "---|" * 9]
    for r in records:
        lines.append(f"| {r['family']} | {r['resolution']} | {r['images']} | {r['bridge_params'] / 1e6:.1f}M | "
                     f"{r['tokens_per_image']} | {r['prompt_tokens']} | {r['prefill_s']:.3f} | "
                     f"{r['kv_cache_bytes'] / 2**20:.1f} | {r['media_cache_bytes'] / 2**20:.1f} |")
    return "\n".join(lines), records


def video_tradeoffs(size, args):
    """The seeds' token budget on clips: each family's video path (and its knob) on the same tower and LM, per frame
    count: LM tokens per clip, prompt length, prefill latency, the LM's KV cache and (Flamingo) the cached media K/V."""
    print("[2b/3] clips: the token budget per family ...", flush=True)
    import numpy as np

    records = []
    frames = size["frames"]
    for name, (family, video) in setups.VIDEO_SETUPS.items():
        if not chosen(name, args.setups):
            continue
        model, processor = setups.family_model(family, size, size["image_size"], video=video, num_frames=max(frames))
        model.to(args.device)
        rng = np.random.default_rng(0)
        clip = rng.integers(0, 256, (max(frames), size["image_size"], size["image_size"], 3), dtype=np.uint8)
        for count in frames:
            inputs = processor(videos=[clip[:count]], text=["<video> what happens ?"], do_sample_frames=False,
                               return_tensors="pt").to(args.device)
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                prefill = measure.median_time(lambda: model(**inputs, use_cache=True), max(1, args.repeats // 2 + 1))
            print(f"  {name}, {count} frames: prefill {prefill:.3f} s", flush=True)
            records.append(dict(
                setup=name, family=FAMILY_NAMES[family], frames=count,
                tokens_per_clip=model.config.num_video_tokens(count), prompt_tokens=int(inputs["input_ids"].shape[1]),
                prefill_s=prefill, kv_cache_bytes=measure.cache_bytes(out.cache),
                media_cache_bytes=measure.media_cache_bytes(getattr(out, "media_cache", None)),
            ))
        del model
    lines = ["| setup | frames | LM tokens / clip | prompt tokens | prefill (s) | KV cache (MB) | cached media K/V (MB) |",
             "|" + "---|" * 7]
    for r in records:
        lines.append(f"| {r['setup']} | {r['frames']} | {r['tokens_per_clip']} | {r['prompt_tokens']} | "
                     f"{r['prefill_s']:.3f} | {r['kv_cache_bytes'] / 2**20:.1f} | {r['media_cache_bytes'] / 2**20:.1f} |")
    return "\n".join(lines), records


# ---- 3. the physical bound ----------------------------------------------------------------------------------------
def bound_table(reference_records, device):
    print("[3/3] memory bandwidth ...", flush=True)
    bandwidth = measure.memory_bandwidth_gbs(device=device)
    lines = [f"Measured memory bandwidth: read {bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s "
             "(the read figure bounds decoding, which streams the weights once per token).", "",
             "| model | LM bytes read / token (MB) | bound (tok/s) | measured (tok/s) | fraction of bound |",
             "|---|---|---|---|---|"]
    records = []
    seen = set()
    for record in reference_records:
        ours = record["ours"]
        if "decode_tok_s" not in ours or record["family"] in seen:
            continue
        seen.add(record["family"])
        bound = bandwidth["read_gbs"] * 1e9 / ours["lm_bytes_per_token"]
        records.append(dict(family=record["family"], bound_tok_s=bound, decode_tok_s=ours["decode_tok_s"],
                            fraction=ours["decode_tok_s"] / bound))
        lines.append(f"| {record['family']} (ours) | {ours['lm_bytes_per_token'] / 2**20:.0f} | {bound:.1f} | "
                     f"{ours['decode_tok_s']:.1f} | {ours['decode_tok_s'] / bound:.0%} |")
    return "\n".join(lines), dict(bandwidth=bandwidth, rows=records)


def plot(path, reference_records, tradeoff_records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    short = {"transformers Llava": "Llava", "transformers Blip2": "Blip2"}
    labels = [f"{r['family'].split(',')[0].replace('-style', '')}\nvs {short.get(r['reference'], r['reference'])}"
              for r in reference_records]
    x = range(len(labels))
    left.bar([i - 0.2 for i in x], [r["prefill_speedup"] for r in reference_records], 0.4, label="prefill")
    left.bar([i + 0.2 for i in x], [r["decode_speedup"] or 0 for r in reference_records], 0.4, label="decode")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks(list(x), labels, fontsize=7)
    left.set_ylabel("speed, ours / reference")
    left.legend()
    for family in FAMILY_NAMES.values():
        rows = [r for r in tradeoff_records if r["family"] == family and r["images"] == 1]
        right.plot([r["resolution"] for r in rows], [r["prefill_s"] for r in rows], marker="o", label=family)
    right.set_xlabel("input resolution (px), one image")
    right.set_ylabel("prefill latency (s)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(setups.SIZES), default="default")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens generated for the decode measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (faster; peak RSS and load time are then not per model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the models run (default: the GPU when there is one)")
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                        help="which tables to measure (default: all; `bound` measures the reference rows too)")
    parser.add_argument("--rows", nargs="+", metavar="TEXT",
                        help="only the reference rows whose label contains one of these (e.g. `clip`, `BLIP-2`)")
    parser.add_argument("--setups", nargs="+", metavar="TEXT",
                        help="only the clip setups whose name contains one of these (e.g. `llava`, `Q-Former`)")
    args = parser.parse_args(argv)
    try:  # checked before the work, not after it
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error('the plot needs matplotlib: pip install -e ".[bench]"')
    torch.set_num_threads(os.cpu_count())
    size = setups.SIZES[args.size]
    tables, load_at_start = set(args.tables), measure.load_average()
    sections, results = [], dict(size=args.size, tables=sorted(tables))
    reference_records = tradeoff_records = None
    if tables & {"reference", "bound"}:
        args.footprint = Footprints(args.in_process)
        try:
            with tempfile.TemporaryDirectory() as work:
                reference_md, reference_records = reference_table(reference_comparisons(work, size, args))
        finally:
            args.footprint.close()
        results["reference"] = reference_records
        sections.append(f"## 1. Against the reference implementations (identical weights)\n\n{reference_md}\n\n"
                        "Speed x: reference latency / ours (prefill) and ours / reference tokens per second (decode); "
                        "above 1 is faster. *recomputed K/V*: the same model recomputing every gated layer's media "
                        "keys/values at each decoding step, as OpenFlamingo does. *OpenFlamingo*: its own modules, "
                        "forward only (its `generate` does not run on transformers 5).")
    if "tradeoffs" in tables:
        tradeoff_md, tradeoff_records = tradeoffs(size, args)
        results["tradeoffs"] = tradeoff_records
        sections.append(f"## 2. Trade-offs (one vision tower, one LM)\n\n{tradeoff_md}")
    if "video" in tables:
        video_md, results["video"] = video_tradeoffs(size, args)
        sections.append(f"### Clips: the token budget (one vision tower, one LM)\n\n{video_md}")
    if "bound" in tables:
        bound_md, results["bound"] = bound_table(reference_records, args.device)
        sections.append(f"## 3. Physical bound\n\n{bound_md}")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{os.cpu_count()} CPU threads"
    report = (f"# vlm-fusion benchmarks (size `{args.size}`, {where}, torch {torch.__version__}, commit {measure.commit()}; "
              f"{load_at_start} at the start, {measure.load_average()} at the end)\n\n"
              + "\n\n".join(sections) + "\n")
    print("\n" + report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plotted = reference_records is not None and tradeoff_records is not None
    if plotted:
        plot(os.path.join(args.out, "benchmarks.png"), reference_records, tradeoff_records)
    print(f"written: {args.out}/tables.md, results.json" + (", benchmarks.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
