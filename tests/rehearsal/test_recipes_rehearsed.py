"""CI's rehearsal of the GPU recipes (README, "Rehearsing a GPU cluster on this CPU"): examples/configs/k2_full.yaml at
world 256 for the first rank of the first, a middle and the last pipeline stage, and examples/configs/k2_mini_1gpu.yaml
on its one GPU, each rank one optimizer step through k2-pretrain's Trainer in its own process
(``python -m k2_megatron.rehearsal ... --ranks first,middle,last``); prints the per-rank memory table.

k2_full is rehearsed as configured, its four overlaps on: megatron's combined 1F1B schedule (the EP all-to-alls of one
micro-batch overlapped with another's computation, expert weight gradients delayed) and megatron DDP's bucketed
gradient reduce-scatter and parameter all-gather, started from its hooks during the step (micro-batch replay runs under
both: k2_megatron/rehearsal/replay.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # about a minute of CPU per rank

RECIPES = {
    "k2_full": ("examples/configs/k2_full.yaml", 256, 1024, []),
    "k2_mini_1gpu": ("examples/configs/k2_mini_1gpu.yaml", 1, 32, []),
}
COMBINED_PHASE = "forward-backward (combined 1F1B)"  # k2_megatron/rehearsal/step.py

# Host synchronisations of the step that the rehearsal finds outside the allowed list (file, function of the issuing
# frame), to be fixed: none today. The last two, megatron's torch.cuda.synchronize after each batched p2p and its
# has_grad_norm_group read, are gone (k2_megatron/megatron/model.py pipeline_communication; the optimizer's build).
KNOWN_UNEXPECTED_SYNCS: set[tuple[str, str]] = set()
# memory categories the dry-run planner (k2_megatron/training/plan.py) must match within 10% (or 1 MiB: k2_mini's
# 96 KiB of small collectives' outputs, e.g. the MoE load statistics, are not planned)
EXACT_CATEGORIES = ("parameters", "gradient buffers", "optimizer state", "activations", "communication buffers")
SMALL = 2**20
# Under megatron's combined 1F1B schedule the planner counts three EP all-to-all outputs at once (a micro-batch's
# dispatch and combine outputs and the other micro-batch's, which megatron interleaves layer by layer: measured
# computing every micro-batch of k2_full's first, middle and last stages, 1.32 GiB on each); micro-batch replay runs a
# replayed micro-batch's backward and another's forward one after the other (k2_megatron/rehearsal/replay.py), so it
# measures two or three: the planner must bound it (megatron pads each expert's rows to 16: +0.8% at K2's sizes), and
# be at most one buffer above.
UPPER_BOUND_UNDER_COMBINED_1F1B = ("communication buffers",)


def _issuer(site: str) -> tuple[str, str]:
    match = re.match(r"(.+?):\d+ in (\S+)", site.split(", called from")[0])
    return match.group(1), match.group(2)


@pytest.fixture(scope="module", params=sorted(RECIPES))
def rehearsed(request, tmp_path_factory):
    config, world, micro_batches, overrides = RECIPES[request.param]
    out = tmp_path_factory.mktemp("rehearsal") / "reports.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "k2_megatron.rehearsal", "--config", config, "--world-size",
                           str(world), "--ranks", "first,middle,last", "--json", str(out), *overrides],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-6000:]  # 1: unexpected host syncs
    with open(out, encoding="utf-8") as f:
        reports = json.load(f)
    return request.param, world, micro_batches, reports, done.stdout


def test_every_pipeline_rank_runs_a_whole_step(rehearsed, capsys):
    name, world, micro_batches, reports, table = rehearsed
    with capsys.disabled():
        print(f"\n{name}:\n{table}")
    stages = {r["pipeline_rank"] for r in reports}
    assert stages == ({0, 8, 15} if world == 256 else {0}), stages
    for r in reports:
        assert r["world_size"] == world and r["micro_batches"] == micro_batches
        assert r["checkpoint"]["tensors"] > 0 and r["checkpoint"]["bytes"] > 0
        phases = {c["phase"] for c in r["collectives"]}
        assert world == 1 or {"forward-backward", "optimizer step", "step metrics"} <= phases, phases
        tensor_collectives = [c for c in r["collectives"] if not c["op"].endswith("_object")]
        assert all(c["device"] == "cuda" for c in tensor_collectives), tensor_collectives
        if world > 1:
            ops = {(c["op"], c["group"]) for c in r["collectives"]}
            assert ("all_to_all_single", "EXPERT_MODEL_PARALLEL_GROUP") in ops
            assert {("send", "PIPELINE_MODEL_PARALLEL_GROUP"), ("recv", "PIPELINE_MODEL_PARALLEL_GROUP")} & ops


def test_k2_full_runs_its_overlaps(rehearsed):
    name, _, micro_batches, reports, _ = rehearsed
    if name != "k2_full":
        pytest.skip("k2_full's overlaps")
    for r in reports:
        chunks = 2  # virtual stages: all but micro-batches 0, 1, 2 and the last of each chunk are replayed
        assert r["replayed"] == chunks * (micro_batches - 4), r["replayed"]
        step = [c for c in r["collectives"] if c["phase"].startswith("forward-backward")]
        # the EP all-to-alls come from the combined 1F1B schedule's dispatch and combine nodes, as many for every
        # micro-batch (replayed ones included)
        a2a = [c for c in step if c["op"] == "all_to_all_single"]
        assert {c["phase"] for c in a2a} == {COMBINED_PHASE}, {c["phase"] for c in a2a}
        assert sum(c["count"] for c in a2a) % micro_batches == 0
        # a steady-state step: each gradient bucket's reduce-scatter is started by megatron DDP's hook in the last
        # micro-batch's backward (not at the end by finalize_model_grads), once per bucket, and its parameter
        # all-gather in the forward; ZeRO-1 over the data-parallel and expert-data-parallel groups
        scatters = [c for c in step if c["op"] == "reduce_scatter_tensor_coalesced"]
        gathers = [c for c in step if c["op"] == "all_gather_into_tensor_coalesced"]
        assert scatters and all("start_grad_sync" in c["site"] and "in finalize" not in c["site"] for c in scatters)
        assert gathers and all("start_param_sync" in c["site"] for c in gathers)
        for group in ("DATA_PARALLEL_GROUP_WITH_CP", "EXPERT_DATA_PARALLEL_GROUP"):
            n_scatter = sum(c["count"] for c in scatters if c["group"] == group)
            assert n_scatter == sum(c["count"] for c in gathers if c["group"] == group) > 0, (r["rank"], group)


def test_planner_matches_the_measured_model_state(rehearsed):
    _, _, _, reports, _ = rehearsed
    for r in reports:
        combined = any(c["phase"] == COMBINED_PHASE for c in r["collectives"])
        for category in EXACT_CATEGORIES:
            measured, planned = r["category_max"][category], r["planned"][category]
            where = (r["rank"], category, measured, planned)
            if combined and category in UPPER_BOUND_UNDER_COMBINED_1F1B:
                assert 2 / 3 * planned * 0.99 <= measured <= planned * 1.01 + SMALL, where
            else:
                assert abs(measured - planned) <= max(0.10 * planned, SMALL), where


def test_planner_matches_each_chunks_micro_batch(rehearsed):
    """The activation peak's two parts, per model chunk, from micro-batch replay's records: what one micro-batch's
    pass keeps until its backward (its received input included) and the high-water mark of its backward above that
    (plan.chunk_activation_bytes, plan.chunk_backward_bytes)."""
    _, _, _, reports, _ = rehearsed
    for r in reports:
        assert len(r["chunk_passes"]) == (2 if r["world_size"] > 1 else 1)  # k2_full: 2 virtual stages per rank
        for i, c in enumerate(r["chunk_passes"]):
            for measured, planned in (("kept", "kept_planned"), ("backward_high", "backward_planned")):
                assert abs(c[measured] - c[planned]) <= 0.10 * c[planned], (r["rank"], i, measured, c)


def test_planner_matches_the_measured_pinned_host_memory(rehearsed):
    """The pinned host memory of the CPU-offloaded activations (StagePlan.offloaded): the rehearsed step is megatron's
    offload warm-up step, which offloads every group (later steps keep the last group of each name on the device)."""
    _, _, _, reports, _ = rehearsed
    for r in reports:
        measured, planned = r["pinned_host"], r["pinned_host_planned"] or 0.0
        assert abs(measured - planned) <= max(0.10 * planned, SMALL), (r["rank"], measured, planned)


def test_planner_matches_the_measured_optimizer_temporaries(rehearsed):
    _, _, _, reports, _ = rehearsed
    for r in reports:
        measured, planned = r["category_max"]["optimizer temporaries"], r["planned"]["optimizer temporaries"]
        assert abs(measured - planned) <= 0.10 * planned, (r["rank"], measured, planned)


def test_no_new_host_synchronisations(rehearsed):
    _, _, _, reports, _ = rehearsed
    for r in reports:
        new = [s for s in r["unexpected_syncs"] if _issuer(s["site"]) not in KNOWN_UNEXPECTED_SYNCS]
        assert not new, new


def test_a_short_step_holds_what_its_warm_up_forwards_keep(tmp_path):
    """k2_full's middle stage with 32 micro-batches per step (train.global_batch_tokens=2097152): the peak comes soon
    after the warm-up, while the forwards replayed before the recorded backward are still held, each holding replay's
    estimate of what a pass keeps (read after micro-batch 2's forward, in megatron's combined 1F1B too). Computing every
    micro-batch measures 13.86 GiB of activations and 1.33 GiB of all-to-all buffers, the planner 13.86 and 1.31."""
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "k2_megatron.rehearsal", "--config", "examples/configs/k2_full.yaml",
                           "--world-size", "256", "--rank", "128", "--json", str(out),
                           "train.global_batch_tokens=2097152"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out, encoding="utf-8") as f:
        [report] = json.load(f)
    assert report["micro_batches"] == 32
    measured, planned = report["category_max"]["activations"], report["planned"]["activations"]
    assert abs(measured - planned) <= 0.05 * planned, (measured, planned)
