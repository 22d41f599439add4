"""Shared test setup: quiet TF logs, 2 logical CPU devices for distribution tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def pytest_collection_modifyitems(config, items):
    """Tests marked `tfx` are skipped, with the reason, where TFX is not installed (the
    host venv on glibc < 2.39); `make test` runs them in the TFX environment."""
    import importlib.util

    if importlib.util.find_spec("tfx") is not None:
        return
    import pytest

    skip = pytest.mark.skip(
        reason="needs TFX 1.21 (glibc >= 2.39): run through `tools/run --tfx` or `make test`"
    )
    for item in items:
        if "tfx" in item.keywords:
            item.add_marker(skip)
