"""The dry-run planner's activation bytes per decoder layer (k2_megatron.training.plan.activation_bytes_per_token)
against what a layer's forward leaves alive for backward under the rehearsal's fake CUDA (k2-mini, a dense and an MoE
layer, one micro-batch; tests/helpers/rehearsal.py ``layer_activations``), as shipped and with K2's memory options
(offload needs CUDA: not measured). The whole-step figures per pipeline stage are test_recipes_rehearsed.py's."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers.rehearsal import run

pytestmark = pytest.mark.slow  # a rehearsal in a fresh process, ~20 s

K2_OPTIONS = ["memory.fp8_activations=true", "memory.recompute=[layernorm,mla_up_proj,swiglu,dense_mlp,shared_expert]"]


@pytest.mark.parametrize("overrides", [[], K2_OPTIONS], ids=["as shipped", "K2 options"])
def test_planned_layer_activations_match_the_rehearsal(overrides):
    out = run("layer_activations", *overrides)
    assert sorted(out["measured"]) == sorted(out["planned"]) == ["1", "2"]  # JSON keys
    for layer, planned in out["planned"].items():
        measured = out["measured"][layer]
        assert abs(measured - planned) <= 0.10 * planned, (layer, measured, planned)
