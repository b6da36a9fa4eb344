"""k2_megatron.megatron.cpu_compat: version gate, install/remove of every patch, and what each patch does."""

import threading

import pytest
import torch


@pytest.fixture
def compat():
    """cpu_compat disabled for the test (other test modules leave it enabled), restored afterwards."""
    if torch.cuda.is_available():
        pytest.skip("cpu_compat only patches when CUDA is unavailable")
    from k2_megatron.megatron import cpu_compat

    was_enabled = cpu_compat.is_enabled()
    cpu_compat.disable()
    yield cpu_compat
    cpu_compat.disable()
    if was_enabled:
        cpu_compat.enable()


def test_names_tested_versions_and_refuses_others(compat, monkeypatch):
    import megatron.core

    assert compat.TESTED_MEGATRON_VERSIONS == ("0.19.2",)
    assert compat.megatron_version() in compat.TESTED_MEGATRON_VERSIONS
    original = torch.cuda.current_device
    monkeypatch.setattr(megatron.core, "__version__", "0.12.0")
    with pytest.raises(RuntimeError, match=r"tested with megatron-core 0\.19\.2; found 0\.12\.0"):
        compat.enable()
    assert not compat.is_enabled()
    assert torch.cuda.current_device is original  # nothing half-installed
    assert compat.enable(allow_untested=True)
    compat.disable()


@pytest.mark.parametrize("reported, release", [
    ("0.19.2", "0.19.2"),
    ("0.19.2+018b65b", "0.19.2"),      # a virtualenv inside a git checkout: megatron appends that repo's commit
    ("0.19.2+g1a2b3c.dirty", "0.19.2"),
])
def test_version_ignores_the_local_part_megatron_appends(compat, monkeypatch, reported, release):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", reported)
    assert compat.megatron_version() == release
    assert compat.enable() is True
    compat.disable()


@pytest.mark.parametrize("reported", ["0.19.3", "0.19.2rc1+abc", "0.19.2.dev0", "0.20.0+018b65b", "not-a-version"])
def test_other_releases_are_still_refused(compat, monkeypatch, reported):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", reported)
    with pytest.raises(RuntimeError, match="tested with megatron-core 0.19.2; found"):
        compat.enable()
    assert not compat.is_enabled()


def test_enable_then_disable_restores_everything(compat):
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher
    from torch._dynamo import config as dynamo_config

    before = {
        "current_device": torch.cuda.current_device, "Stream": torch.cuda.Stream,
        "get_rng_state": torch.cuda.get_rng_state, "add": mrandom.CudaRNGStatesTracker.add,
        "fork": mrandom.CudaRNGStatesTracker.fork, "move": token_dispatcher.maybe_move_tensor_to_cpu,
        "dynamo": dynamo_config.disable,
    }
    assert compat.enable() is True
    assert compat.enable() is True  # idempotent
    assert torch.cuda.current_device() == "cpu"
    assert torch.cuda.Stream is not before["Stream"]
    assert token_dispatcher.maybe_move_tensor_to_cpu is not before["move"]
    assert dynamo_config.disable is True
    compat.disable()
    after = {
        "current_device": torch.cuda.current_device, "Stream": torch.cuda.Stream,
        "get_rng_state": torch.cuda.get_rng_state, "add": mrandom.CudaRNGStatesTracker.add,
        "fork": mrandom.CudaRNGStatesTracker.fork, "move": token_dispatcher.maybe_move_tensor_to_cpu,
        "dynamo": dynamo_config.disable,
    }
    assert after == before
    assert torch.zeros(1).device.type == "cpu"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the device mode is gone as well


def test_does_nothing_when_cuda_is_available(compat, monkeypatch):
    original = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compat.enable() is False
    assert not compat.is_enabled() and torch.cuda.current_device is original


def test_cuda_tensors_are_created_on_cpu(compat):
    with compat.cpu_mode() as installed:
        assert installed
        assert torch.zeros(3, device="cuda").device.type == "cpu"
        assert torch.tensor([1.0], device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.empty(2, pin_memory=True).device.type == "cpu"
        assert torch.arange(4, device="cuda:0").tolist() == [0, 1, 2, 3]
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda.current_stream().wait_stream(stream)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        torch.cuda.synchronize()
        # megatron's optimizers dispatch on the CUDA type names
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.ones(2).type(torch.float64).dtype == torch.float64  # conversions are untouched
    assert not compat.is_enabled()
    assert torch.ones(2).type() == "torch.FloatTensor"


def test_rng_tracker_runs_on_the_cpu_generator(compat):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    with compat.cpu_mode():
        def draws():
            model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
            torch.manual_seed(5)
            default_before = torch.get_rng_state()
            with get_cuda_rng_tracker().fork():
                a = torch.rand(4)
            assert torch.equal(torch.get_rng_state(), default_before)  # default stream untouched by the fork
            with get_cuda_rng_tracker().fork():
                b = torch.rand(4)  # continues the tracked stream
            return a, b, torch.rand(4)

        a1, b1, c1 = draws()
        a2, b2, c2 = draws()
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and torch.equal(c1, c2)
    assert not torch.equal(a1, b1)
    torch.manual_seed(5)
    assert torch.equal(c1, torch.rand(4))  # default CPU stream as if no fork had happened
    g = torch.Generator().manual_seed(123 + 2718)  # megatron's tensor-model-parallel seed for tp_rank 0
    assert torch.equal(a1, torch.rand(4, generator=g))


def test_all_to_all_split_sizes_become_host_lists(compat):
    from megatron.core.transformer.moe import token_dispatcher

    with compat.cpu_mode():
        splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
        assert splits.tolist() == [3, 1] and not torch.is_tensor(splits)
        t = torch.tensor([2])
        assert token_dispatcher.maybe_move_tensor_to_cpu(t) is t


def test_disable_must_run_on_the_enabling_thread(compat):
    compat.enable()
    errors = []

    def other():
        try:
            compat.disable()
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "thread that called enable()" in errors[0]
    assert compat.is_enabled()
