"""Stand-ins for the modules `test_modeling_common.py` imports that transformers' sdist does not ship.

`from .exporters.test_export import ExportTesterMixin` and `from .generation.test_utils import GenerationTesterMixin`:
both are mixins of tests (torch.export and `generate` tests) that we do not run from here; empty classes keep
`ModelTesterMixin` importable. Our own test classes do not inherit `GenerationTesterMixin` (it would bring no tests).
"""

import sys
import types


class ExportTesterMixin:
    """Stand-in for transformers' `tests/exporters/test_export.py::ExportTesterMixin`: no export tests."""


class GenerationTesterMixin:
    """Stand-in for transformers' `tests/generation/test_utils.py::GenerationTesterMixin`: no generate tests."""


def _module(name: str, **attributes) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        sys.modules[name] = module
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def install_shims(package: str) -> None:
    """Register `<package>.exporters.test_export` and `<package>.generation.test_utils` in `sys.modules`."""
    for sub, leaf, mixin in (("exporters", "test_export", ExportTesterMixin),
                             ("generation", "test_utils", GenerationTesterMixin)):
        parent = _module(f"{package}.{sub}", __path__=[], __package__=f"{package}.{sub}")
        child = _module(f"{package}.{sub}.{leaf}", **{mixin.__name__: mixin})
        setattr(parent, leaf, child)
        setattr(sys.modules[package], sub, parent)
