"""Bring transformers' own common model tests (`tests/test_modeling_common.py`) within reach of our test module.

transformers' tests are not part of its wheel, and this project does not ship them: they are read from the sdist of
the installed transformers version, found (first match wins)

1. in `$TRANSFORMERS_TESTS_DIR`: a `tests/` folder holding `test_modeling_common.py`, or an extracted sdist holding
   `tests/`;
2. in the cache, `$VLM_FUSION_TEST_CACHE` (default `~/.cache/vlm-fusion`)`/transformers-<version>/tests`;
3. otherwise downloaded into that cache with `pip download --no-deps --no-binary :all: transformers==<version>`
   (only the sdist's `tests/*.py` are extracted; the archive is deleted afterwards).

`parameterized`, which transformers' tests import, is taken from the environment or `pip install --target`ed into the
same cache. When any of this cannot be had (no network, no pip), `load()` skips the calling module with the reason.

The sdist ships only the top-level test files, not `tests/generation/` nor `tests/exporters/`, which
`test_modeling_common.py` imports from: `hf_common_shims.py` stands in for them (empty mixins).

The tests are imported as the package `_transformers_tests` (its `__path__` is the sdist's `tests/`), so their
relative imports resolve, and nothing named `tests` clashes with this repository's own tests.
"""

import importlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types

import pytest

PACKAGE = "_transformers_tests"
SKIP_ENV = "VLM_FUSION_NO_TRANSFORMERS_TESTS"  # set to 1 to skip without looking for the sdist at all


def _version() -> str:
    import transformers

    return transformers.__version__


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VLM_FUSION_TEST_CACHE") or pathlib.Path.home() / ".cache" / "vlm-fusion")


def _tests_dir_in(path: pathlib.Path) -> pathlib.Path | None:
    for candidate in (path, path / "tests"):
        if (candidate / "test_modeling_common.py").is_file():
            return candidate
    return None


def _pip(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def _download_tests(version: str, target: pathlib.Path) -> None:
    """`pip download` the sdist of transformers `version` and extract its `tests/*.py` into `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        run = _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp,
                   f"transformers=={version}")
        archives = sorted(pathlib.Path(tmp).glob(f"transformers-{version}.tar.gz"))
        if run.returncode != 0 or not archives:
            raise RuntimeError(f"`pip download transformers=={version}` (sdist) failed: "
                               f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
        staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent))
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and m.name.endswith(".py") and "/" not in m.name[len(prefix):]]
            if not any(m.name.endswith("/test_modeling_common.py") for m in members):
                raise RuntimeError(f"the sdist of transformers {version} holds no tests/test_modeling_common.py")
            for member in members:
                data = tar.extractfile(member).read()
                (staging / pathlib.Path(member.name).name).write_bytes(data)
        try:
            staging.rename(target)  # atomic: a half-extracted folder is never taken for a cached one
        except OSError:  # another test process (pytest-xdist's workers) renamed its complete copy first: keep that one
            shutil.rmtree(staging)
            if _tests_dir_in(target) is None:
                raise


def find_tests_dir() -> pathlib.Path:
    """The `tests/` folder of the sdist of the installed transformers (downloading it when needed)."""
    explicit = os.environ.get("TRANSFORMERS_TESTS_DIR")
    if explicit:
        found = _tests_dir_in(pathlib.Path(explicit))
        if found is None:
            raise RuntimeError(f"TRANSFORMERS_TESTS_DIR={explicit} holds no test_modeling_common.py (nor tests/ with it)")
        return found
    version = _version()
    cached = cache_root() / f"transformers-{version}" / "tests"
    if _tests_dir_in(cached) is None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        if cached.exists():
            shutil.rmtree(cached)
        _download_tests(version, cached)
    return cached


def ensure_parameterized() -> None:
    try:
        import parameterized  # noqa: F401
        return
    except ImportError:
        pass
    site = cache_root() / "site-packages"
    if not (site / "parameterized").is_dir():
        run = _pip("install", "--quiet", "--no-deps", "--target", str(site), "parameterized==0.9.0")
        if run.returncode != 0:
            raise RuntimeError(f"`parameterized` is not installed and `pip install` failed: "
                               f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
    sys.path.append(str(site))
    importlib.invalidate_caches()
    import parameterized  # noqa: F401,F811


def _import_common(tests_dir: pathlib.Path) -> types.ModuleType:
    from hf_common_shims import install_shims

    package = sys.modules.get(PACKAGE)
    if package is None:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests_dir)]
        package.__package__ = PACKAGE
        sys.modules[PACKAGE] = package
    install_shims(PACKAGE)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


def load() -> types.ModuleType:
    """transformers' `test_modeling_common` module, or a module-level skip saying why it cannot be had."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: transformers' common model tests are not run", allow_module_level=True)
    try:
        tests_dir = find_tests_dir()
        ensure_parameterized()
    except (RuntimeError, OSError, subprocess.SubprocessError, tarfile.TarError) as error:
        pytest.skip(f"transformers' own tests (from its sdist) cannot be had: {error}. Set TRANSFORMERS_TESTS_DIR "
                    "to an extracted sdist's tests/ folder to run them.", allow_module_level=True)
    return _import_common(tests_dir)
