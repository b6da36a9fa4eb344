"""Shared pytest hooks. Helpers live in tests/helpers/ (``from tests.helpers.model import ...``); the markers are
declared in pytest.ini."""

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with one reason, on a machine where torch sees no CUDA device (asked once, after
    collection, so that no test module queries the device when it is imported)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
