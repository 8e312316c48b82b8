"""The benchmark code runs (on a tiny size) so that it cannot rot; its numbers are not checked here."""

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run  # noqa: E402


def test_benchmark_smoke_run_writes_all_tables(tmp_path):
    assert run.main(["--size", "tiny", "--in-process", "--repeats", "1", "--new-tokens", "3", "--out", str(tmp_path)]) == 0
    tables = (tmp_path / "tables.md").read_text()
    for heading in ("Against the reference", "Trade-offs", "Physical bound"):
        assert heading in tables
    results = json.loads((tmp_path / "results.json").read_text())
    families = {r["family"] for r in results["reference"]}
    assert {"LLaVA-style", "BLIP-2-style", "Flamingo-style, 4 images"} <= families
    assert all(r["prefill_speedup"] > 0 for r in results["reference"])
    assert {r["family"] for r in results["tradeoffs"]} == {"LLaVA-style", "BLIP-2-style", "Flamingo-style"}
    assert results["bound"]["bandwidth"]["read_gbs"] > 0
    assert (tmp_path / "benchmarks.png").stat().st_size > 10_000


def test_the_training_benchmark_runs(tmp_path):
    """benchmarks/train.py on the tiny size: a row per stage, both trainers measured."""
    import train

    assert train.main(["--size", "tiny", "--steps", "2", "--samples", "8", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "training.json").read_text())
    assert [r["stage"] for r in rows] == ["align", "instruct", "flamingo"]
    assert all(r["ours"]["samples_per_s"] > 0 and r["trl"]["samples_per_s"] > 0 for r in rows)
