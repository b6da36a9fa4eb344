"""A whole training step rehearsed through megatron-core (k2_megatron.rehearsal.step): micro-batch replay reports
what computing every micro-batch reports, and a host synchronisation inserted into the MoE forward is caught with
its location. Each scenario runs in a fresh process (tests/helpers/rehearsal.py)."""

from __future__ import annotations

import os
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers.rehearsal import assert_replay_matches_computed, run

pytestmark = pytest.mark.slow  # each scenario runs a rehearsal in a fresh process


@pytest.mark.parametrize("rank", [0, 1])
def test_replay_reports_what_computing_every_micro_batch_reports(monkeypatch, rank):
    # k2-tiny on PP2 with virtual stages: 8 micro-batches of 4 sequences, interleaved 1F1B, both stages
    monkeypatch.setenv("REPLAY", "both")
    out = run("step", "-", "2", str(rank), "parallel.pipeline=2", "parallel.virtual_stages=2",
              "train.micro_batch_size=4")
    replay, computed = out["replay"], out["computed"]
    assert replay["micro_batches"] == computed["micro_batches"] == 8
    assert_replay_matches_computed(replay, computed, hidden_state=128 * 4 * 64 * 4)  # seq x micro-batch x hidden x fp32
    assert {c["group"] for c in computed["collectives"]} >= {"PIPELINE_MODEL_PARALLEL_GROUP"}


def test_an_item_in_the_moe_forward_is_reported_with_its_location():
    out = run("moe_item")
    rows = [s for s in out["unexpected"] if f"tests/helpers/rehearsal.py:{out['line']} in forward_with_item"
            in s["site"]]
    assert len(rows) == 1, out["unexpected"]
    assert rows[0]["kind"] == "value read" and rows[0]["phase"] == "forward-backward"
    assert rows[0]["count"] == 3 * 4  # k2-tiny: 3 MoE layers x 4 micro-batches (the replayed one counted too)
    assert "permuted_probs.sum().item()" in rows[0]["code"]
