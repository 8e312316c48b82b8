"""The benchmarks and the GPU check run (tiny size, on the CPU) so that they cannot rot; their numbers are not checked.
The runs themselves are marked slow (minutes each): `.ci/run` runs them after the default suite (`-m slow`).

`scripts/gpu_check.py --device cpu --dry-run` runs once for this module: every step it runs on a GPU, here — the tests
of tests/test_cuda.py on the CPU, `python benchmarks/run.py` as the README gives it (each model loaded in a process
of its own), serving (skipped where vLLM is not installed). The tests read its report and what run.py wrote.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import setups  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

CUDA_TESTS = ["test_fp32_logits_and_tokens_on_the_device_are_the_cpus", "test_half_precision_generates_the_fp32_answer",
              "test_device_map_auto_over_the_gpu_the_cpu_and_disk",
              "test_4bit_on_the_device_keeps_tower_bridge_and_head_in_full_precision", "test_sdpa_gives_eagers_logits",
              "test_static_cache_and_compile_generate_what_the_dynamic_cache_does",
              "test_one_train_step_in_bf16_on_the_device",
              "test_one_train_step_in_bf16_on_two_gpus_through_the_launcher"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(out), "--device", "cpu",
                           "--dry-run"], capture_output=True, text=True, timeout=900)
    print(f"gpu_check dry run: {time.monotonic() - started:.0f} s\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    return done, out, report, {step["name"]: step for step in report["steps"]}


@pytest.mark.slow  # the GPU check's dry run builds and times every benchmark model (2 minutes): .ci/run runs it
def test_run_py_runs_as_the_readme_gives_it(dry_run):
    """`python benchmarks/run.py` (each model loaded in a process of its own): every reference row, IDEFICS too."""
    _, out, _, steps = dry_run
    step = steps["benchmarks"]
    assert step["status"] == "passed", step.get("output_tail")
    command = step["commands"][0].split()
    assert command[1] == "benchmarks/run.py" and "--in-process" not in command
    assert command[command.index("--size") + 1] == "tiny" and command[command.index("--device") + 1] == "cpu"
    tables = (out / "benchmarks" / "tables.md").read_text()
    for heading in ("Against the reference", "Trade-offs", "Physical bound"):
        assert heading in tables
    results = json.loads((out / "benchmarks" / "results.json").read_text())
    rows = [(r["family"], r["reference"]) for r in results["reference"]]
    flamingo = [("Flamingo-style, 4 images", "recomputed K/V"), ("Flamingo-style, 4 images", "OpenFlamingo")]
    assert rows == [("LLaVA-style", "transformers Llava"),
                    ("LLaVA-style, static cache + compile", "transformers Llava, same settings"),
                    (f"LLaVA-style, a {setups.SIZES['tiny']['frames'][0]}-frame clip", "transformers LlavaOnevision"),
                    ("BLIP-2-style", "transformers Blip2"), *(flamingo if setups.open_flamingo_available() else []),
                    ("Flamingo-style (IDEFICS), 4 images", "transformers Idefics")]
    for record in results["reference"]:
        assert record["prefill_speedup"] > 0
        for side in (record["ours"], record["ref"]):  # each model loaded in a process of its own
            assert side["load_s"] > 0 and side["peak_rss_mb"] > 0
            assert side.get("decode_tok_s", 1) > 0
    log = (out / step["log"]).read_text()
    assert "Flamingo-style (IDEFICS), 4 images vs transformers Idefics: prefill" in log  # each row as it is measured
    assert {r["family"] for r in results["tradeoffs"]} == {"LLaVA-style", "BLIP-2-style", "Flamingo-style"}
    assert "Clips: the token budget" in tables  # every family's video setup at every frame count, as the config counts
    assert [(r["setup"], r["frames"]) for r in results["video"]] == [
        (name, frames) for name in setups.VIDEO_SETUPS for frames in setups.SIZES["tiny"]["frames"]]
    assert all(r["prompt_tokens"] > r["tokens_per_clip"] > 0 and r["prefill_s"] > 0 for r in results["video"])
    assert results["bound"]["bandwidth"]["read_gbs"] > 0
    assert (out / "benchmarks" / "benchmarks.png").stat().st_size > 10_000


@pytest.mark.slow  # loads a model in a fresh interpreter: .ci/run runs it
def test_a_footprint_that_fails_forked_is_measured_again_in_a_fresh_interpreter(tmp_path):
    """run.py forks each footprint's process from a helper; one that fails there is retried in a fresh interpreter,
    which measures the rest (here it fails too, so its own error is what is raised)."""
    import run

    footprints = run.Footprints(in_process=False)
    spec = dict(kind="ours", path=str(tmp_path / "missing"), prompt="<image>", image_size=32, num_images=1)
    try:
        with pytest.raises(RuntimeError, match="loading ours failed"):
            footprints(spec)
    finally:
        footprints.close()
    assert footprints.server is False  # fresh interpreters from now on


@pytest.mark.slow  # the same dry run: .ci/run runs it
def test_the_gpu_check_dry_run_runs_every_step_and_reports_it(dry_run):
    done, out, report, steps = dry_run
    assert done.returncode == 0, done.stdout[-3000:]
    assert list(steps) == ["install", "loading-tests", "benchmarks", "compile-train-tests", "serve"]
    assert steps["install"]["status"] == "skipped" and "--dry-run installs nothing" in steps["install"]["reason"]
    assert report["environment"]["versions"]["torch"] and report["environment"]["commit"]
    tests = {}
    for name in ("loading-tests", "compile-train-tests"):
        assert steps[name]["status"] == "passed", steps[name]
        for test in steps[name]["tests"]:
            tests.setdefault(test["test"].split("::")[1].split("[")[0], []).append(test)
    assert sorted(tests) == sorted(CUDA_TESTS)  # every test of tests/test_cuda.py ran, on the CPU, and passed
    assert all(t["outcome"] == "passed" for runs in tests.values() for t in runs)
    assert len(tests["test_fp32_logits_and_tokens_on_the_device_are_the_cpus"]) == 3  # one per family
    offloaded = tests["test_device_map_auto_over_the_gpu_the_cpu_and_disk"]
    assert all("max_abs_dlogit_vs_cpu" in t["figures"] for t in offloaded)  # passed: within test_cuda's bound
    assert all(json.loads(t["figures"]["modules_per_device"]).keys() == {"cpu", "disk"} for t in offloaded)
    assert all(t["figures"]["compiled_graphs"] > 0
               for t in tests["test_static_cache_and_compile_generate_what_the_dynamic_cache_does"])
    if importlib.util.find_spec("vllm") is None:
        assert steps["serve"]["status"] == "skipped" and "vLLM is not installed" in steps["serve"]["reason"]
    else:
        # the dry run serves one batch of 2 (`--batches 2`) per family, measured on both engines
        assert steps["serve"]["status"] == "passed"
        assert [(r["family"], r["batch"]) for r in steps["serve"]["results"]] == [("llava", 2), ("flamingo", 2)]
        assert all(r["transformers"] > 0 and r["vllm"] > 0 for r in steps["serve"]["results"])
    assert report["elapsed_s"] < report["budget_minutes"] * 60
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# vlm-fusion GPU check: no GPU (`cpu`)")
    for expected in ("| tests: loading and precision | passed |", "| benchmarks/run.py | passed |",
                     "### 1. Against the reference implementations", "test_sdpa_gives_eagers_logits[fusion_blip2-bf16]",
                     "max_abs_dlogit_sdpa_vs_eager"):
        assert expected in markdown


def test_a_step_that_outlasts_the_budget_is_stopped_and_the_rest_not_run(tmp_path, monkeypatch):
    for name, seconds in (("REPORT_RESERVE_S", 0), ("KILL_GRACE_S", 2), ("MIN_STEP_S", 1)):  # seconds, not minutes
        monkeypatch.setattr(gpu_check, name, seconds)
    budget_s = 6
    check = gpu_check.Check(gpu_check.parse([str(tmp_path), "--device", "cpu", "--dry-run",
                                             "--budget", str(budget_s / 60)]))
    started = time.monotonic()
    stopped = check.step("sleeper")
    check.run(stopped, [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(600)"])
    # interrupted at its share of the budget (plus the grace to exit), not at the sleep's end 600 s on; the margin
    # is for a loaded machine (CI once took 6.005 s for a 6 s budget), far below the sleep
    assert time.monotonic() - started < budget_s + gpu_check.KILL_GRACE_S + 30
    assert stopped["status"] == "stopped" and stopped["returncode"] is None and "started" in stopped["output_tail"]
    assert any("KeyboardInterrupt" in line for line in stopped["output_tail"])  # SIGINT first: it could clean up
    late = check.step("next")
    assert check.run(late, [sys.executable, "-c", "pass"]) is False
    assert late["status"] == "not run" and late["reason"].startswith("time budget")
    check.save()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["stopped", "not run"]
    assert "sleeper: stopped (time budget: stopped after" in (tmp_path / "report.md").read_text()


INTERRUPTED = """
import signal, sys
sys.path.insert(0, sys.argv[1])
import gpu_check

signal.signal(signal.SIGTERM, gpu_check.interrupted)  # as gpu_check.main does
check = gpu_check.Check(gpu_check.parse([sys.argv[2], "--device", "cpu", "--dry-run"]))
try:
    check.run(check.step("sleeper"), [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); "
                                                            "time.sleep(600)"])
except KeyboardInterrupt:
    check.save()
"""


def test_a_terminated_check_stops_its_step_and_writes_the_report(tmp_path):
    """SIGTERM (or SIGHUP, Ctrl-C) reaches the check, not the step's own session: the check stops the step's process
    group, so nothing is left running, and writes what it has."""
    import signal

    check = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(ROOT / "scripts"), str(tmp_path)])
    log = tmp_path / "logs" / "sleeper.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and len(log.read_text().splitlines()) > 1) and time.monotonic() < deadline:
        time.sleep(0.1)
    sleeper = int(log.read_text().splitlines()[1])
    check.send_signal(signal.SIGTERM)
    assert check.wait(timeout=30) == 0
    step = json.loads((tmp_path / "report.json").read_text())["steps"][0]
    assert step["status"] == "stopped" and step["reason"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)  # the step's process is gone


def test_a_test_step_reports_outcomes_figures_and_each_failures_first_lines(tmp_path, monkeypatch):
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n\n"
                     "def test_measured(record_property):\n    record_property('max_abs_dlogit', 1.5e-07)\n\n"
                     "def test_wrong():\n    assert 1 + 1 == 3, 'arithmetic'\n\n"
                     "@pytest.mark.skip(reason='needs two GPUs')\ndef test_skipped():\n    pass\n")
    monkeypatch.setattr(gpu_check, "CUDA_TESTS", str(tests))
    check = gpu_check.Check(gpu_check.parse([str(tmp_path / "out"), "--device", "cpu", "--dry-run"]))
    gpu_check.cuda_tests(check, "loading-tests", "not nothing")
    check.save()
    step = check.report["steps"][0]
    outcomes = {t["test"].split("::")[1]: t for t in step["tests"]}
    assert step["status"] == "failed" and step["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert outcomes["test_measured"]["figures"] == {"max_abs_dlogit": 1.5e-07}
    assert outcomes["test_wrong"]["message"][0] == "E       AssertionError: arithmetic"
    assert outcomes["test_skipped"]["reason"] == "needs two GPUs"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Failures" in markdown and "E       AssertionError: arithmetic" in markdown
    assert "| `test_measured` | passed |" in markdown and "max_abs_dlogit 1.5e-07" in markdown


@pytest.mark.slow  # trains each stage (1.5 minutes): .ci/run runs it
def test_the_training_benchmark_runs(tmp_path):
    """benchmarks/train.py on the tiny size: a row per stage, ours and the baseline measured (TRL; LAVIS for the
    Q-Former's stage 1)."""
    import train

    assert train.main(["--size", "tiny", "--steps", "2", "--samples", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "training.json").read_text())
    assert [(r["stage"], r["baseline"]) for r in rows] == [("align", "TRL"), ("instruct", "TRL"), ("flamingo", "TRL"),
                                                           ("qformer", "LAVIS")]
    assert all(r["ours"]["samples_per_s"] > 0 and r["trl"]["samples_per_s"] > 0 for r in rows)


@pytest.mark.slow  # runs vlm-fusion train on generated data (1 minute): .ci/run runs it
def test_the_data_benchmark_runs(tmp_path):
    """benchmarks/data.py on 100 samples, one process: the fixed-cost run, the first run, the rerun and LLaVA's lazy
    loader, each in a process of its own, and the table and its JSON written."""
    spec = importlib.util.spec_from_file_location("data_benchmark", ROOT / "benchmarks" / "data.py")
    data_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_benchmark)

    assert data_benchmark.main(["--sizes", "100", "--processes", "1", "--skip-webdataset", "--skip-video", "--work",
                                str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "data.json").read_text())
    [row] = record["rows"]
    assert (row["size"], row["processes"]) == (100, 1)
    for kind in ("first", "rerun", "baseline"):
        assert row[kind]["first_step_s"] > 0 and row[kind]["peak_mb"] > 0 and row[kind]["cpu_s_at_first_step"] > 0
    assert row["first"]["processes"] == 1 and row["baseline"]["mismatches"] == 0  # LLaVA's masking found every turn
    assert row["rerun"]["goal_rerun_10s"] in (True, False) and row["first"]["goal_rss_flat"] is True
    table = (tmp_path / "data.md").read_text()
    for line in ("| 100 | 1 | first run |", "| 100 | 1 | rerun |", "| 100 | 1 | LLaVA lazy (baseline) |"):
        assert line in table


@pytest.mark.slow  # five runs of vlm-fusion train on clips (1 minute): .ci/run runs it
def test_the_data_benchmarks_clip_rows_run(tmp_path, monkeypatch):
    """benchmarks/data.py's clip rows on a pool of 4 short clips: 8 and 16 clip samples in one process, and the clip
    shards against the same pairs as LLaVA JSON; clips/s, peak RSS and the flatness goal in the table and its JSON."""
    pytest.importorskip("av")
    spec = importlib.util.spec_from_file_location("data_benchmark", ROOT / "benchmarks" / "data.py")
    data_benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data_benchmark)
    monkeypatch.setattr(data_benchmark, "POOL_CLIPS", 4)
    monkeypatch.setattr(data_benchmark, "CLIP_SECONDS", 1)

    assert data_benchmark.main(["--skip-images", "--skip-webdataset", "--video-clips", "8,16", "--processes", "1",
                                "--video-steps", "2", "--video-stream-samples", "16", "--clip-shard-size", "8",
                                "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "data.json").read_text())
    assert record["rows"] == [] and [(r["clips"], r["processes"]) for r in record["video"]] == [(8, 1), (16, 1)]
    for row in record["video"]:
        assert row["run"]["samples_per_s"] > 0 and row["run"]["peak_mb"] > 0 and row["run"]["children_peak_mb"] > 0
        assert 0 <= row["run"]["waiting_share"] <= 1 and row["run"]["goal_rss_flat"] in (True, False)
    stream = record["video_stream"]
    assert stream["available"], stream.get("reason")
    assert stream["webdataset"]["samples_per_s"] > 0 and stream["json"]["samples_per_s"] > 0
    table = (tmp_path / "data.md").read_text()
    assert "## Clips: `--stage instruct`" in table and "| 8 | 1 | " in table and "| 16 | 1 | " in table
    assert "| tar shards of `KEY.mp4` (8 clips each) |" in table


@pytest.mark.slow  # trains every clip setup for 2 steps (a minute or two): .ci/run runs it
def test_the_clips_benchmark_runs(tmp_path):
    """benchmarks/clips.py from tiny image models of each family: a row per setup at 8 frames (the Perceiver's 64
    latents too), its cost measured and its accuracy per temporal question type, the table written."""
    import clips as clips_benchmark

    from vlm_fusion.demo import clips
    from vlm_fusion.tools.tiny import tiny_model_and_processor

    for family, name in (("fusion_llava", "llava"), ("fusion_blip2", "blip2"), ("fusion_flamingo", "flamingo")):
        model, processor = tiny_model_and_processor(family)  # image models: the benchmark adds their video paths
        model.save_pretrained(tmp_path / "images" / name)
        processor.save_pretrained(tmp_path / "images" / name)
    assert clips_benchmark.main(["--image-models", str(tmp_path / "images"), "--frames", "8", "--steps", "2",
                                 # the BLIP-2 stages on the cells need the demo's tower (a patch a cell)
                                 "--clip-text-steps", "2", "--rows-steps", "0", "--words-steps", "0",
                                 "--batch-size", "2", "--per-kind", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "clips.json").read_text())
    setups_at_8 = [name for name, (_, _, frames) in clips_benchmark.SETUPS.items() if 8 in frames]
    assert [r["setup"] for r in rows] == setups_at_8
    assert all(r["prefill_ms"] > 0 and r["kv_bytes"] > 0 and r["train_samples_s"] > 0 for r in rows)
    assert all(set(r["accuracy"]) == set(clips.TEMPORAL_TYPES) for r in rows)
    by_setup = {r["setup"]: r for r in rows}  # the knobs took: fewer LM tokens a clip than the plain video path
    assert by_setup["llava, pooled 4 (bilinear)"]["tokens_per_clip"] < by_setup["llava, every patch"]["tokens_per_clip"]
    assert by_setup["blip2, video Q-Former"]["tokens_per_clip"] < by_setup["blip2, per frame"]["tokens_per_clip"]
    table = (tmp_path / "clips.md").read_text()
    assert "| llava, every patch | 8 |" in table and "| 1.00 |" in table  # the baseline's ratios to itself
