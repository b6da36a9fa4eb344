"""The rehearsal harness itself (k2_megatron.rehearsal): NCCL's rules on the fake process group, host
synchronisations with their locations, device memory by category, the declared MoE routing, the fake-CUDA patches'
gates. The scenarios that need a rehearsal session run in one fresh process (tests/helpers/rehearsal.py)."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np
import pytest

from tests.helpers.rehearsal import run

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
               "send", "recv")


@pytest.fixture(scope="module")
def harness():
    return run("harness")


@pytest.fixture(scope="module")
def collectives(harness):
    return harness["collectives"]


@pytest.mark.slow
@pytest.mark.parametrize("op", COLLECTIVES)
def test_a_host_tensor_in_any_collective_fails_like_nccl_with_its_location(collectives, op):
    error = collectives[f"host {op}"]
    assert error["type"] == "NCCLRuleError", error
    message = error["message"]
    assert f"torch.distributed.{op} on TEST_PAIR_GROUP (2 ranks)" in message
    assert "a cpu tensor" in message and "No backend type associated with device type cpu" in message
    assert f"tests/helpers/rehearsal.py:{collectives['issuing lines'][op]} in <lambda>" in message
    assert collectives[f"device {op}"]["type"] is None  # the same collective on device tensors is fine


@pytest.mark.slow
def test_collectives_are_recorded_with_group_bytes_dtype_and_device(collectives):
    records = {r["op"]: r for r in collectives["records"] if r["group"] == "TEST_PAIR_GROUP"}
    assert set(COLLECTIVES) <= set(records)
    assert records["all_reduce"] == {"op": "all_reduce", "group": "TEST_PAIR_GROUP", "group_size": 2, "bytes": 16,
                                     "dtype": "float32", "device": "cuda"}
    assert records["all_gather_into_tensor"]["bytes"] == 32  # nccl-tests' convention: the gathered output
    assert records["reduce_scatter_tensor"]["bytes"] == 16   # the input
    assert records["all_to_all_single"]["bytes"] == 16
    assert all(r["device"] == "cuda" for r in records.values())


@pytest.mark.slow
def test_gloo_groups_take_host_tensors(collectives):
    assert collectives["host all_reduce on gloo"]["type"] is None
    assert {"op": "all_reduce", "group": "TEST_GLOO_GROUP", "group_size": 2, "bytes": 16, "dtype": "float32",
            "device": "cpu"} in collectives["records"]


@pytest.mark.slow
def test_size_rules_of_the_process_group(collectives):
    assert collectives["wrong all_gather size"]["type"] == "NCCLRuleError"
    assert "output has 6 elements, the input's 4 x 2 ranks = 8 expected" in collectives["wrong all_gather size"][
        "message"]
    assert collectives["wrong all_to_all splits"]["type"] == "NCCLRuleError"
    assert "output split sizes [1, 2] must have 2 entries summing to the output's first dimension 4" in \
        collectives["wrong all_to_all splits"]["message"]


@pytest.mark.slow
def test_host_synchronisations_are_reported_with_their_location_and_made_up_values(harness):
    out = harness["host_syncs"]
    assert out["item"] == 0.0 and out["flag"] is True and out["listed"] == [0.0, 0.0, 0.0]
    assert out["copied device"] == "cpu"
    assert out["shape error"]["type"] == out["rehearsal error"]
    assert "depends on device values" in out["shape error"]["message"]
    assert out["host value"] == 6  # host tensors are real
    kinds = [(e["kind"], e["line"], e["count"]) for e in out["events"]]
    assert ("value read", out["lines"]["item"], 1) in kinds
    assert ("device-to-host copy", out["lines"]["cpu"], 1) in kinds
    assert any(k == "value read" and n == 3 for k, _, n in kinds)  # a .tolist() of 3 elements: one read of 3
    assert all(e["file"] == "tests/helpers/rehearsal.py" for e in out["events"])
    assert out["unexpected"] == len(out["events"])  # none of them is on the allowed list


@pytest.mark.slow
def test_memory_by_category_at_the_peak_and_after_frees(harness):
    out = harness["memory"]
    kib = 1024
    assert out["weight"] == 512 * kib
    assert out["at_peak"]["parameters"] == 512 * kib
    assert out["at_peak"]["gradient buffers"] == 1024 * kib
    assert out["at_peak"]["activations"] == (2048 + 4096) * kib  # the peak came with the 4 MiB temporary
    assert out["peak"] == (512 + 1024 + 2048 + 4096) * kib
    assert out["category_max"]["activations"] == 6144 * kib
    assert out["allocated"] == (512 + 1024 + 2048) * kib  # torch.cuda.memory_allocated() answers the live bytes
    assert out["after_free"] == (512 + 1024) * kib
    assert out["after_resize"] == out["after_free"]  # a storage resized to nothing holds nothing
    assert out["after_regrow"] == out["after_free"] + 512 * kib
    assert out["after_all"] == out["after_free"]


@pytest.mark.slow
def test_fake_cuda_answers_runs_a_backward_and_restores_everything(harness):
    out = harness["fake_cuda_patches"]
    assert out["available before"] is False and out["available after"] is False
    assert out["inside"] == {"available": True, "count": 8, "current": 3, "name": "NVIDIA H100 80GB HBM3",
                             "capability": [9, 0], "memory": 81559 * 2**20}  # an H100 SXM 80GB's total_memory
    assert out["backward"] == {"grad shape": [4, 2], "grad device": "cuda:3", "indexed": [3, 1, 4]}
    assert out["restored"] is True
    assert out["refuses while cpu_compat"]["type"] == "RuntimeError"
    assert "cpu_compat is enabled" in out["refuses while cpu_compat"]["message"]


# ----- in-process: no session -----

def test_routing_balanced_and_skewed_counts():
    from k2_megatron.rehearsal.routing import Routing

    balanced = Routing().expert_loads(tokens=4096, topk=8, num_experts=384, local_experts=range(24, 48))
    assert balanced.sum() == 4096 * 8 and balanced.max() - balanced.min() <= 1
    skewed = Routing(4).expert_loads(tokens=4096, topk=8, num_experts=384, local_experts=range(24, 48))
    assert skewed.sum() == 4096 * 8
    mean = 4096 * 8 / 384
    np.testing.assert_allclose(skewed[24:48], 4 * mean, atol=1)
    assert skewed.max() <= 4096
    assert Routing.parse("skewed:4") == Routing(4) and Routing.parse("balanced") == Routing()
    with pytest.raises(ValueError, match="skewed:<s>"):
        Routing.parse("hot")
    with pytest.raises(ValueError, match="skew must be a finite number >= 1"):
        Routing(0.5)
    with pytest.raises(ValueError, match="exceeds all 384 experts' load"):
        Routing(17).expert_loads(tokens=64, topk=8, num_experts=384, local_experts=range(0, 24))


def test_dispatch_counts_describe_one_exchange():
    from types import SimpleNamespace

    import torch

    from k2_megatron.rehearsal.routing import Routing

    dispatcher = SimpleNamespace(routing_map=torch.zeros(100, 8, dtype=torch.bool),
                                 config=SimpleNamespace(moe_router_topk=2), ep_size=2, tp_size=1, num_local_experts=4,
                                 local_expert_indices=[4, 5, 6, 7], num_experts=8)
    counts = Routing(2).dispatch_counts(dispatcher)
    assert counts.input_splits.sum() == 200 and counts.input_splits.tolist() == [0, 200]  # all to the hot rank
    assert counts.output_splits.tolist() == [200, 200]
    assert counts.global_tokens_per_local_expert.shape == (2, 4)
    assert counts.tokens_per_local_expert.tolist() == [100, 100, 100, 100]


def test_fake_cuda_refuses_untested_releases(monkeypatch):
    import megatron.core
    import torch

    from k2_megatron.rehearsal import fake_cuda

    fake_cuda.check_versions()
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu128")
    with pytest.raises(RuntimeError, match=r"tested with torch 2\.13; found 2\.12\.0"):
        fake_cuda.check_versions()
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    monkeypatch.setattr(megatron.core, "__version__", "0.18.0")
    with pytest.raises(RuntimeError, match=r"tested with megatron-core 0\.19\.2; found 0\.18\.0"):
        fake_cuda.check_versions()
    assert not fake_cuda.is_enabled()


def test_allowed_syncs_are_documented():
    from k2_megatron.rehearsal.host_sync import ALLOWED_SYNCS

    assert len({a.name for a in ALLOWED_SYNCS}) == len(ALLOWED_SYNCS)
    for allowed in ALLOWED_SYNCS:
        assert len(allowed.why) > 40 and (allowed.detail or (allowed.file and allowed.function))


@pytest.mark.slow
def test_a_killed_runtime_build_does_not_block_the_next_rehearsal(tmp_path):
    """What a build killed half-way leaves in the cache (torch's extension builder's `lock` file, in any build
    directory) must not make the next rehearsal wait for it: the runtime stand-in builds in a private directory."""
    import subprocess
    import sys

    import torch

    from tests.helpers import REPO_ROOT

    for leftover in (f"rehearsal-torch{torch.__version__.replace('+', '-')}", ".rehearsal-build-killed"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "lock").write_text("")
    env = dict(os.environ, K2_REHEARSAL_CACHE=str(tmp_path),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "from k2_megatron.rehearsal import fake_cuda; print(fake_cuda.install_runtime())"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the runtime build waited on a killed build's lock file")
    assert done.returncode == 0, done.stderr[-3000:]
    built = done.stdout.strip().splitlines()[-1]
    assert os.path.dirname(built) == str(tmp_path) and os.path.exists(built)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".rehearsal-build-")) == \
        [".rehearsal-build-killed"]  # its own build directory is gone
