"""Uneven pipeline layouts with virtual stages (megatron-core's pipeline_model_parallel_layout) for K2.

The full 61-layer K2 on PP16 x VPP2 (the report's layout) is checked without building a model: its
MLATransformerConfig (no parameters) and the K2 decoder block spec of every (pipeline stage, virtual stage),
against megatron-core's own get_transformer_layer_offset / get_num_layers_to_build under a faked
parallel_state. A real 2-process run of an uneven layout is in test_pipeline_layout_distributed.py.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from k2_megatron.config import ParallelLayout, get_preset
from k2_megatron.config.parallel import balanced_chunk_layers, resolve_pipeline_layout

PP, VPP = 16, 2


@pytest.fixture(scope="module")
def k2_pp16_vpp2():
    from k2_megatron.megatron import to_transformer_config

    return to_transformer_config(get_preset("k2"), ParallelLayout(pipeline_parallel=PP, virtual_pipeline_stages=VPP,
                                                                   expert_parallel=16, pipeline_layout="auto"))


def _is_moe_spec(spec) -> bool:
    from k2_megatron.megatron.moe import K2MoELayer

    mlp = spec.submodules.mlp
    return getattr(mlp, "func", None) is K2MoELayer


def test_k2_61_layers_pp16_vpp2_cover_every_layer_once(k2_pp16_vpp2):
    from k2_megatron.megatron.spec import get_k2_decoder_block_spec, stage_layer_range

    tc = k2_pp16_vpp2
    assert tc.num_layers == 61 and tc.virtual_pipeline_model_parallel_size == VPP
    assert tc.num_layers_in_first_pipeline_stage is None and tc.num_layers_in_last_pipeline_stage is None
    seen = []
    for vp in range(VPP):          # chunk order: all stages' virtual stage 0, then virtual stage 1
        for pp in range(PP):
            layers = stage_layer_range(tc, vp_stage=vp, pp_rank=pp)
            assert len(layers) >= 1
            specs = get_k2_decoder_block_spec(tc, vp_stage=vp, pp_rank=pp).layer_specs
            assert len(specs) == len(layers)
            for layer, spec in zip(layers, specs):
                assert _is_moe_spec(spec) == (layer != 0), f"layer {layer} (pp {pp}, vp {vp})"
            seen.extend(layers)
    assert seen == list(range(61))  # contiguous, in chunk order, each layer exactly once
    # chunk sizes: 1 layer in chunk 0 (with the embedding) and the last two chunks (the last with the output
    # layer), 2 elsewhere; every pipeline stage holds 3 or 4 layers
    sizes = [len(stage_layer_range(tc, vp_stage=c // PP, pp_rank=c % PP)) for c in range(PP * VPP)]
    assert sizes == [1] + [2] * 29 + [1, 1]
    per_stage = [sizes[s] + sizes[s + PP] for s in range(PP)]
    assert sorted(set(per_stage)) == [3, 4] and sum(per_stage) == 61


def test_k2_layout_matches_megatron_offsets(k2_pp16_vpp2):
    """Our per-stage ranges equal megatron-core's get_transformer_layer_offset / get_num_layers_to_build, asked
    as each (pp rank, vp stage) of a PP16 x VPP2 parallel_state (set with megatron's setters, then restored)."""
    from megatron.core.transformer.enums import LayerType

    tc = k2_pp16_vpp2
    layout = tc.pipeline_model_parallel_layout
    assert layout.flatten_layout[0] == LayerType.embedding and layout.layout[0][0][0] == LayerType.embedding
    assert layout.flatten_layout[-1] == LayerType.loss and layout.layout[PP - 1][VPP - 1][-1] == LayerType.loss
    _assert_stage_ranges_match_megatron(tc, PP, VPP)


@pytest.mark.parametrize("layers, sizes", [
    (64, dict(pipeline_parallel=16, virtual_pipeline_stages=2)),                            # even
    (61, dict(pipeline_parallel=16, first_stage_layers=3, last_stage_layers=2)),            # uneven first / last
    (62, dict(pipeline_parallel=16, virtual_pipeline_stages=2, first_stage_layers=4, last_stage_layers=2)),
    (60, dict(pipeline_parallel=4, virtual_pipeline_stages=3, last_stage_layers=6)),
])
def test_split_without_a_layout_string_matches_megatron_offsets(layers, sizes):
    """ParallelLayout's split (evenly, or with first/last stage sizes) is megatron-core's, stage by stage."""
    from k2_megatron.megatron import to_transformer_config

    tc = to_transformer_config(get_preset("k2", num_hidden_layers=layers), ParallelLayout(expert_parallel=16, **sizes))
    assert tc.pipeline_model_parallel_layout is None
    _assert_stage_ranges_match_megatron(tc, sizes["pipeline_parallel"], sizes.get("virtual_pipeline_stages") or 1)


def _assert_stage_ranges_match_megatron(tc, pp_size, vpp_size):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from k2_megatron.megatron.spec import stage_layer_range

    saved = (ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE,
             ps._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE)
    covered = []
    try:
        ps.set_pipeline_model_parallel_world_size(pp_size)
        ps.set_virtual_pipeline_model_parallel_world_size(vpp_size if vpp_size > 1 else None)
        for pp in range(pp_size):
            ps.set_pipeline_model_parallel_rank(pp)
            for vp in range(vpp_size):
                vp_stage = vp if vpp_size > 1 else None
                offset = get_transformer_layer_offset(tc, vp_stage=vp_stage)
                count = get_num_layers_to_build(tc, vp_stage=vp_stage)
                assert stage_layer_range(tc, vp_stage=vp_stage) == range(offset, offset + count), (pp, vp)
                assert stage_layer_range(tc, vp_stage=vp_stage, pp_rank=pp) == range(offset, offset + count)
                covered.extend(range(offset, offset + count))
    finally:
        ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = saved[:2]
        ps._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = saved[2]
    assert sorted(covered) == list(range(tc.num_layers))


def test_auto_layout_strings():
    assert resolve_pipeline_layout(5, 2, 2, "auto") == "Et|tt|t|tL"
    assert resolve_pipeline_layout(4, 2, None, "AUTO") == "Ett|ttL"
    auto = resolve_pipeline_layout(61, 16, 2, "auto")
    assert auto == "Et|" + "tt|" * 29 + "t|tL"
    # the same layout written with megatron's repeat syntax is accepted as given
    explicit = "Et|(tt|)*29,t|tL"
    assert resolve_pipeline_layout(61, 16, 2, explicit) == explicit
    explicit_chunks, auto_chunks = [ParallelLayout(pipeline_parallel=16, virtual_pipeline_stages=2,
                                                   pipeline_layout=layout).chunk_layers(61) for layout in (explicit, "auto")]
    assert explicit_chunks == auto_chunks
    assert balanced_chunk_layers(64, 32) == [2] * 32
    assert balanced_chunk_layers(7, 4) == [1, 2, 2, 2]
    assert balanced_chunk_layers(5, 4) == [1, 2, 1, 1]


def test_auto_layout_splits_as_balanced_chunk_layers():
    for layers, chunks in ((61, 32), (5, 4), (7, 4), (64, 32), (9, 2)):
        layout = ParallelLayout(pipeline_parallel=chunks, pipeline_layout="auto")
        assert layout.chunk_layers(layers) == balanced_chunk_layers(layers, chunks)


@pytest.mark.parametrize("layout, pp, vpp, match", [
    ("Et|tt|t|tL", 2, None, r"4 chunks, but pipeline_parallel x virtual_pipeline_stages = 2 x 1 = 2"),
    ("Et|tt|tt|tL", 2, 2, r"6 decoder layers \('t'\), but num_hidden_layers=5"),
    ("Ett|tt||tL", 2, 2, r"chunk 2 has no decoder layer"),
    ("tEt|tt|t|L", 2, 2, r"chunk 0 is 'tEt'"),
    ("Et|tt|tL|t", 2, 2, r"chunk 2 is 'tL'"),
    ("Et|tt|t|tmL", 2, 2, r"multi-token-prediction"),
    ("Et|tx|t|tL", 2, 2, r"not a valid megatron layout string"),
    ("auto", 1, 2, r"pipeline_layout needs pipeline_parallel >= 2"),
    ("auto", 4, 2, r"cannot balance 5 layers over 8 pipeline chunks"),
    ("", 2, 2, r"pipeline_layout must be 'auto' or a megatron layout string"),
])
def test_bad_layouts_raise_naming_the_problem(layout, pp, vpp, match):
    cfg = get_preset("k2-tiny", num_hidden_layers=5)
    with pytest.raises(ValueError, match=match):
        ParallelLayout(pipeline_parallel=pp, virtual_pipeline_stages=vpp, pipeline_layout=layout).check_model(cfg)


def test_layout_excludes_first_last_stage_layers_and_lifts_the_divisibility_rule():
    cfg = get_preset("k2")
    with pytest.raises(ValueError, match="not divisible by pipeline_parallel x virtual_pipeline_stages"):
        ParallelLayout(pipeline_parallel=16, virtual_pipeline_stages=2, expert_parallel=16).check_model(cfg)
    ParallelLayout(pipeline_parallel=16, virtual_pipeline_stages=2, expert_parallel=16,
                   pipeline_layout="auto").check_model(cfg)
    with pytest.raises(ValueError, match="cannot be combined with first_stage_layers"):
        ParallelLayout(pipeline_parallel=16, virtual_pipeline_stages=2, pipeline_layout="auto",
                       first_stage_layers=2).check_model(cfg)
