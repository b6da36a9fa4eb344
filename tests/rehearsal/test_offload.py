"""megatron-core's fine-grained activation offloading (memory.cpu_offload) under the rehearsal: our experts'
expert_fc1 / moe_act groups move their FP8 inputs to pinned host memory, megatron's offload manager agrees on the
bytes, and micro-batch replay reports what computing every micro-batch reports. Each scenario runs in a fresh
process (tests/helpers/rehearsal.py ``offload_step``: every saved tensor offloadable, k2-tiny's being below
megatron's default minimum size)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers.rehearsal import assert_replay_matches_computed, run

pytestmark = pytest.mark.slow  # each scenario runs a rehearsal in a fresh process

FP8_SWIGLU = ("memory.fp8_activations=true", "memory.recompute=[swiglu]")
EVERY_MODULE = "memory.cpu_offload=[attn_norm,qkv_linear,core_attn,attn_proj,mlp_norm,expert_fc1,moe_act]"


def _fp8_tile_bytes(rows: int, cols: int) -> int:
    """An FP8 1x128-tiled copy: one byte per element and an fp32 scale per tile (k2_megatron.ops.fp8_tile_quantize)."""
    return rows * cols + rows * math.ceil(cols / 128) * 4


def test_the_experts_offload_their_fp8_inputs():
    from k2_megatron.config import get_preset

    k2 = get_preset("k2-tiny")
    rows = 8 * 128 * k2.num_experts_per_tok  # routed copies of one micro-batch (8 x 128 tokens) on the one EP rank
    moe_layers = k2.num_hidden_layers - k2.first_k_dense_replace
    fc1_in = _fp8_tile_bytes(rows, k2.hidden_size)                    # dispatched tokens, FP8
    swiglu_in = _fp8_tile_bytes(rows, 2 * k2.moe_intermediate_size)  # fc1 output, FP8
    probs = rows * 4                    # the routing weights the SwiGLU checkpoint also saves (fp32)
    on = run("offload_step", "1", "0", *FP8_SWIGLU, "memory.cpu_offload=[expert_fc1,moe_act]")
    off = run("offload_step", "1", "0", *FP8_SWIGLU, "memory.cpu_offload=[]")
    (kept_on,), (kept_off,) = on["records"], off["records"]
    # the device bytes a micro-batch keeps for backward drop by the FP8 inputs of every MoE layer; the routing weights
    # are copied too but stay alive on the device (the MoE layer holds them)
    assert kept_off["kept"] - kept_on["kept"] == moe_layers * (fc1_in + swiglu_in)
    assert kept_off["pinned_kept"] == 0
    assert kept_on["pinned_kept"] == moe_layers * (fc1_in + swiglu_in + probs)
    # PP1: one micro-batch in flight at a time, so the rank's pinned host memory is one micro-batch's
    assert on["replay"]["pinned_host"] == kept_on["pinned_kept"] and off["replay"]["pinned_host"] == 0
    # megatron's own account of its warm-up step (the first micro-batch; the last layer's groups are kept on the
    # device from then on, their reload being needed at once)
    assert on["megatron_offloaded"] == [{"expert_fc1": (moe_layers - 1) * fc1_in,
                                         "moe_act": (moe_layers - 1) * (swiglu_in + probs)}]
    assert not [s for s in on["replay"]["unexpected_syncs"] if "fine_grained_activation_offload" in s["site"]]
    assert not [s for s in on["replay"]["syncs"] if s["kind"] == "device-to-host copy" and "offload" in s["site"]]


def test_replay_with_offload_reports_what_computing_every_micro_batch_reports(monkeypatch):
    # k2-tiny on PP2 with virtual stages (interleaved 1F1B, 8 micro-batches), every offloadable module offloaded
    monkeypatch.setenv("REPLAY", "both")
    out = run("offload_step", "2", "1", "parallel.pipeline=2", "parallel.virtual_stages=2",
              "train.micro_batch_size=4", *FP8_SWIGLU, EVERY_MODULE)
    replay, computed = out["replay"], out["computed"]
    assert replay["micro_batches"] == computed["micro_batches"] == 8
    assert computed["pinned_host"] > 0
    assert replay["pinned_host"] == computed["pinned_host"]
    # seq x micro-batch x hidden x fp32; replay's known excess (2.1 hidden states measured). It was 5.1: replayed
    # forwards kept their received input, which megatron's attn_norm offload frees once copied (replay.py)
    assert_replay_matches_computed(replay, computed, hidden_state=128 * 4 * 64 * 4)
    # megatron's offload manager saw the same warm-up in both (its chunk queue follows the real forwards)
    assert out["megatron_offloaded"][0] == out["megatron_offloaded"][1] and out["megatron_offloaded"][0]
