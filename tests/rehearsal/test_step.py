"""A whole training step rehearsed through megatron-core (k2_megatron.rehearsal.step): micro-batch replay reports
what computing every micro-batch reports, and a host synchronisation inserted into the MoE forward is caught with
its location. Each scenario runs in a fresh process (tests/helpers/rehearsal.py)."""

from __future__ import annotations

import os
from collections import Counter

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers.rehearsal import run

pytestmark = pytest.mark.slow  # each scenario runs a rehearsal in a fresh process


def _counts(rows):
    c = Counter()
    for row in rows:
        c[(row["op"] if "op" in row else row["kind"], row.get("group", row.get("site")), row["phase"])] += row["count"]
    return c


@pytest.mark.parametrize("rank", [0, 1])
def test_replay_reports_what_computing_every_micro_batch_reports(monkeypatch, rank):
    # k2-tiny on PP2 with virtual stages: 8 micro-batches of 4 sequences, interleaved 1F1B, both stages
    monkeypatch.setenv("REPLAY", "both")
    out = run("step", "-", "2", str(rank), "parallel.pipeline=2", "parallel.virtual_stages=2",
              "train.micro_batch_size=4")
    replay, computed = out["replay"], out["computed"]
    assert replay["micro_batches"] == computed["micro_batches"] == 8
    # replay's known excess (k2_megatron/rehearsal/replay.py): up to two hidden states per model chunk
    hidden_state = 128 * 4 * 64 * 4  # seq x micro-batch x hidden x fp32
    excess = 2 * 2 * hidden_state
    assert computed["peak_total"] <= replay["peak_total"] <= computed["peak_total"] * 1.005 + excess
    for category, value in computed["category_max"].items():
        assert value - 64 * 1024 <= replay["category_max"][category] <= value * 1.005 + excess, category
    assert _counts(replay["collectives"]) == _counts(computed["collectives"])
    assert _counts(replay["syncs"]) == _counts(computed["syncs"])
    assert {c["group"] for c in computed["collectives"]} >= {"PIPELINE_MODEL_PARALLEL_GROUP"}


TINY_PP2_EP2 = ("parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.expert=2", "train.micro_batch_size=2",
                "model.params_dtype=bfloat16")  # world 4: 8 micro-batches per step, 2 model chunks per rank
COMBINED_1F1B = ("parallel.overlap_moe_expert_parallel_comm=true", "parallel.delay_wgrad_compute=true")
BUCKETED_OVERLAP = ("parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true",
                    "parallel.ddp_bucket_size=100000")


@pytest.mark.parametrize("rank, overlaps", [(0, COMBINED_1F1B), (3, COMBINED_1F1B), (3, BUCKETED_OVERLAP),
                                            (0, COMBINED_1F1B + BUCKETED_OVERLAP)],
                         ids=["combined-1f1b-first-stage", "combined-1f1b-last-stage", "bucketed-ddp-last-stage",
                              "all-overlaps-first-stage"])
def test_replay_under_the_overlaps_reports_what_computing_reports(monkeypatch, rank, overlaps):
    # k2_full's four overlaps on k2-tiny (PP2 x 2 virtual stages x EP2, world 4): megatron's combined 1F1B schedule
    # with delayed expert weight gradients, and megatron DDP's bucketed reduce-scatter / parameter all-gather
    monkeypatch.setenv("REPLAY", "both")
    out = run("step", "-", "4", str(rank), *TINY_PP2_EP2, *overlaps)
    replay, computed = out["replay"], out["computed"]
    assert replay["micro_batches"] == computed["micro_batches"] == 8
    assert replay["replayed"] == 2 * (8 - 4) and computed["replayed"] == 0  # per chunk all but 0, 1, 2 and the last
    assert _counts(replay["collectives"]) == _counts(computed["collectives"])
    assert _counts(replay["syncs"]) == _counts(computed["syncs"])
    hidden_state = 128 * 2 * 64 * 2  # seq x micro-batch x hidden x bf16
    excess = 2 * 2 * hidden_state  # replay's known excess, as above
    # combined 1F1B interleaves micro-batch f's forward with b's backward layer by layer; where one of them is
    # replayed they run one after the other (k2_megatron/rehearsal/replay.py), so the all-to-all outputs of one
    # layer of each are not alive together: up to one layer's dispatch and combine outputs of a micro-batch fewer
    a2a_layer = 2 * (128 * 2 * 2 * 64 * 2)  # 2 x (tokens x top-k x hidden x bf16)
    assert computed["peak_total"] - a2a_layer <= replay["peak_total"] <= computed["peak_total"] * 1.005 + excess
    for category, value in computed["category_max"].items():
        below = a2a_layer if category == "communication buffers" else 64 * 1024
        assert value - below <= replay["category_max"][category] <= value * 1.005 + excess, category
    ops = _counts(computed["collectives"])
    if overlaps is not BUCKETED_OVERLAP:  # 2 MoE layers per chunk... dispatch and combine per micro-batch
        assert ops[("all_to_all_single", "EXPERT_MODEL_PARALLEL_GROUP", "forward-backward")] > 0


def test_an_item_in_the_moe_forward_is_reported_with_its_location():
    out = run("moe_item")
    rows = [s for s in out["unexpected"] if f"tests/helpers/rehearsal.py:{out['line']} in forward_with_item"
            in s["site"]]
    assert len(rows) == 1, out["unexpected"]
    assert rows[0]["kind"] == "value read" and rows[0]["phase"] == "forward-backward"
    assert rows[0]["count"] == 3 * 4  # k2-tiny: 3 MoE layers x 4 micro-batches (the replayed one counted too)
    assert "permuted_probs.sum().item()" in rows[0]["code"]
