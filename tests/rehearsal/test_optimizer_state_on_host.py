"""The optimizer state in host memory (memory.optimizer_state_on_host), rehearsed (python -m k2_megatron.rehearsal)
next to the dry-run planner, on the small config of test_optimizer_memory.py (k2-tiny widened, expert data-parallel
size 1 as k2_full's, rank 0 of world 2 with EP2, bf16 weights: fp32 master shards exist; budget 1 MiB). On fake CUDA
tensors, where mixing host and device tensors in one operation raises: the step runs, the device holds no optimizer
state, the pinned host memory holds all of it (as much as the device held with the switch off: the planner's
figure), the step's temporaries stay within twice the budget, and the planner agrees with each measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers import REPO_ROOT
from tests.rehearsal.test_optimizer_memory import BUDGET_MIB, OVERRIDES

pytestmark = pytest.mark.slow  # a rehearsal in its own process, ~20 s


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("state_on_host") / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "k2_megatron.rehearsal", "--world-size", "2", "--rank", "0",
                           "--json", str(out), *OVERRIDES, "model.params_dtype=bfloat16",
                           "memory.optimizer_state_on_host=true"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]  # no unexpected host syncs either
    with open(out, encoding="utf-8") as f:
        reports = json.load(f)
    return reports[0] if isinstance(reports, list) else reports


def _device_state_off() -> float:
    """The planner's device optimizer state of the same rank with the switch off (the rehearsal's test of it
    measures that: test_optimizer_memory.py, test_recipes_rehearsed.py)."""
    from k2_megatron.config import load_config
    from k2_megatron.training.plan import plan_memory

    cfg = load_config(None, [*OVERRIDES, "model.params_dtype=bfloat16"])
    return plan_memory(cfg, 2).stages[0].optimizer


def test_no_optimizer_state_on_the_device(report):
    # 8 bytes: megatron's constant _scale_one of each sub-optimizer (optimizer/optimizer.py), as with the switch off
    assert report["category_max"]["optimizer state"] <= 64, report["category_max"]
    assert report["planned"]["optimizer state"] == 0


def test_the_host_holds_the_state_and_the_planner_agrees(report):
    host, planned = report["host_optimizer_state"], report["planned_host_optimizer_state"]
    assert planned == pytest.approx(_device_state_off())
    assert host > 0 and abs(host - planned) <= 0.10 * planned, (host, planned)


def test_the_streamed_step_stays_within_twice_the_budget(report):
    budget = BUDGET_MIB * 2**20
    temporaries = report["category_max"]["optimizer temporaries"]
    small = 64 * 2**10  # the step's flags, max logits and QK-Clip factors
    assert 0 < temporaries <= 2 * budget + small, temporaries / budget
    planned = report["planned"]["optimizer temporaries"]
    assert abs(temporaries - planned) <= 0.10 * planned, (temporaries, planned)


def test_host_copies_of_fake_device_tensors_are_host_tensors():
    """On fake CUDA tensors, a host copy of a device tensor is on the host, also when it is too large to be made
    for real (k2_full's expert master shards: fake host tensors)."""
    import torch

    from k2_megatron.megatron.host_state import host_tensor
    from k2_megatron.rehearsal import fake_cuda
    from k2_megatron.rehearsal.session import REAL_HOST_TENSOR_LIMIT, rehearsal

    with rehearsal(2, 0, device=fake_cuda.H100):
        for numel in (10, REAL_HOST_TENSOR_LIMIT):  # 4 bytes each: a real and a fake host tensor
            device = torch.empty(numel, device="cuda")
            for copy in (False, True):
                host = host_tensor(device, device.device, copy=copy)
                assert host.device.type == "cpu" and host.shape == device.shape, (numel, copy, host.device)
                with pytest.raises(RuntimeError, match="devices|device"):
                    host.add_(device)  # host and device mixed in one operation: refused
