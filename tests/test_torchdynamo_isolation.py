"""TORCHDYNAMO_DISABLE does not leak from one test into the next (tests/conftest.py restores it around every test):
torch.compile reads it when called, and a leaked "1" (k2_megatron.training.pretrain sets it when imported) turned
the compile test into an eager self-comparison. The fixture that turns dynamo on for one test (``dynamo_enabled``)
gives dynamo's own switch back as it found it (cpu_compat reads and sets that switch). The tests run in this order
(pytest's file order); run alone, the later ones skip."""

import os

import pytest

_seen = {}


def test_a_test_sets_torchdynamo_disable():
    import torch._dynamo

    _seen["env"], _seen["switch"] = os.environ.get("TORCHDYNAMO_DISABLE"), torch._dynamo.config.disable
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # as importing k2_megatron.training.pretrain does


def test_the_next_test_starts_as_the_session_did():
    if "env" not in _seen:
        pytest.skip("needs test_a_test_sets_torchdynamo_disable to run first (deselected)")
    assert os.environ.get("TORCHDYNAMO_DISABLE") == _seen["env"]


def test_dynamo_enabled_turns_dynamo_on(dynamo_enabled):
    import torch._dynamo

    assert "TORCHDYNAMO_DISABLE" not in os.environ and torch._dynamo.config.disable is False


def test_dynamo_enabled_gives_dynamos_switch_back():
    import torch._dynamo

    if "switch" not in _seen:
        pytest.skip("needs test_a_test_sets_torchdynamo_disable to run first (deselected)")
    assert torch._dynamo.config.disable == _seen["switch"]
