"""Shared pytest hooks and fixtures. Helpers live in tests/helpers/ (``from tests.helpers.model import ...``); the
markers are declared in pytest.ini."""

import os

import pytest

# torch.compile reads TORCHDYNAMO_DISABLE each time it is called (torch/_dynamo/eval_frame.py) and becomes a no-op
# when it is "1"; k2_megatron.training.pretrain sets it when imported (for megatron's jit_fuser). Captured here,
# before any test module is imported, and given back to every test.
_DYNAMO_ENV = "TORCHDYNAMO_DISABLE"
_SESSION_DYNAMO_ENV = os.environ.get(_DYNAMO_ENV)


def _set_dynamo_env(value) -> None:
    if value is None:
        os.environ.pop(_DYNAMO_ENV, None)
    else:
        os.environ[_DYNAMO_ENV] = value


@pytest.fixture(autouse=True)
def _isolate_torchdynamo_disable():
    """Every test starts with TORCHDYNAMO_DISABLE as the session found it, and what a test (or a module it imports)
    sets is undone after it, so that no test silently turns another's torch.compile into eager execution.
    (megatron on the CPU runs eager anyway: cpu_compat switches dynamo off while it is enabled.)"""
    _set_dynamo_env(_SESSION_DYNAMO_ENV)
    yield
    _set_dynamo_env(_SESSION_DYNAMO_ENV)


@pytest.fixture
def dynamo_enabled(monkeypatch):
    """torch.compile really compiles in this test: TORCHDYNAMO_DISABLE unset and dynamo's own switch
    (torch._dynamo.config.disable, which cpu_compat sets) off, both restored after; dynamo's caches reset."""
    import torch._dynamo

    monkeypatch.delenv(_DYNAMO_ENV, raising=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):  # (pytest's monkeypatch would delete the config entry on undo)
        yield
    torch._dynamo.reset()


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
