"""Markers transformers' common tests put on their tests (registered by transformers' own conftest, absent here)."""

TRANSFORMERS_MARKERS = {
    "accelerate_tests": "needs accelerate and several devices (transformers' marker)",
    "flash_attn_test": "needs flash-attn (transformers' marker)",
    "flash_attn_3_test": "needs flash-attn 3 (transformers' marker)",
    "flash_attn_4_test": "needs flash-attn 4 (transformers' marker)",
    "torch_compile_test": "runs torch.compile (transformers' marker)",
    "torch_export_test": "runs torch.export (transformers' marker)",
    "generate": "a generate test (transformers' marker)",
}


def pytest_configure(config):
    for name, description in TRANSFORMERS_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
