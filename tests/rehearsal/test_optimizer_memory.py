"""The optimizer step's temporaries, rehearsed (python -m k2_megatron.rehearsal) next to the dry-run planner: k2-tiny
widened so that its expert gradient buffer (expert data-parallel size 1, as k2_full's) is many times the Muon buffer
budget (memory.muon_buffer_mib = 1), on rank 0 of world 2 with EP2 (dense parameters ZeRO-1 over 2 ranks), each
layer's expert stack (32 local experts) four times the budget. Whatever the step allocates stays within twice the
budget (the gather span, and one Newton-Schulz call with the kernel's workspace), far below what checking or gathering
the whole buffer at once takes, or what megatron-core's own clipping fallback copies (each gradient shard: the
expert stack's; k2_megatron.megatron.multi_tensor scales in place), and the planner's figure is within 10% of the
measurement. The gradient norm is computed without a host read per tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # a rehearsal in its own process, ~15 s

BUDGET_MIB = 1
OVERRIDES = [f"memory.muon_buffer_mib={BUDGET_MIB}", "model.overrides.moe_intermediate_size=256",
             "model.overrides.n_routed_experts=64", "parallel.expert=2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("optimizer_memory") / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "k2_megatron.rehearsal", "--world-size", "2", "--rank", "0",
                           "--json", str(out), *OVERRIDES], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-6000:]  # 1: unexpected host syncs
    with open(out, encoding="utf-8") as f:
        reports = json.load(f)
    return reports[0] if isinstance(reports, list) else reports


def test_the_optimizer_step_stays_within_twice_the_muon_budget(report):
    budget = BUDGET_MIB * 2**20
    expert_buffer = 3 * 32 * 3 * 64 * 256 * 4  # 3 MoE layers x 32 local experts x (gate, up, down) of 64 x 256, fp32
    assert report["category_max"]["gradient buffers"] > expert_buffer > 4 * budget  # the buffer dwarfs the budget
    expert_stack = 32 * 2 * 256 * 64 * 4  # one layer's fc1 [gate; up] of 32 experts, fp32 (expert-DP 1: not sharded)
    assert expert_stack > 2 * budget + 64 * 2**10  # megatron's clipping fallback, copying it, would not fit below
    temporaries = report["category_max"]["optimizer temporaries"]
    small = 64 * 2**10  # the step's flags, max logits and QK-Clip factors
    assert 0 < temporaries <= 2 * budget + small, temporaries / budget


def test_the_planner_agrees_with_the_measured_optimizer_temporaries(report):
    measured, planned = report["category_max"]["optimizer temporaries"], report["planned"]["optimizer temporaries"]
    assert abs(measured - planned) <= 0.10 * planned, (measured, planned)


def test_the_gradient_norm_reads_nothing_per_tensor(report):
    # megatron-core's fallback (megatron/core/utils.py local_multi_tensor_l2_norm) reads each tensor's norm
    syncs = [s["site"] for s in report["unexpected_syncs"] if "megatron/core/utils.py" in s["site"]]
    assert not syncs, syncs
