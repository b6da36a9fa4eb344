"""An uneven pipeline layout with virtual stages, for real: k2-tiny with 5 layers (1 dense + 4 MoE; 5 does not
divide the 4 model chunks) on PP2 x VPP2, 2 gloo processes, megatron's interleaved 1F1B schedule.

Layouts: "auto" (Et|tt|t|tL: layers 0 | 1,2 | 3 | 4) and an explicit one (Ett|t|t|tL: layers 0,1 | 2 | 3 | 4).
Every rank loads the same whole state dict, runs forward_backward_func over 4 microbatches, then rebuilds the
model unsharded (the two ranks as data parallel) and runs the same microbatches: the losses must agree, and each
rank must hold exactly the layers the layout gives it (the dense layer 0 first).
"""


import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEQ, MICRO_BATCH, MICROBATCHES = 16, 2, 4
NUM_LAYERS = 5
# layout -> 1-based layer numbers held by (pp rank 0, pp rank 1), chunk by chunk
LAYOUTS = {"auto": ([1, 4], [2, 3, 5]), "Ett|t|t|tL": ([1, 2, 4], [3, 5])}
LOSS_RTOL = 2e-6  # float32; the pipeline split only changes the order of a few reductions


def _worker(rank, world, init_file, state_path):
    results = {}
    from tests.helpers.model import k2_like_tiny_config, make_batches, train_step_losses
    from megatron.core import parallel_state

    from k2_megatron.checkpoint import load_megatron_state_dict
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    cfg = k2_like_tiny_config(num_hidden_layers=NUM_LAYERS)
    full = torch.load(state_path)
    batches = make_batches(cfg, MICROBATCHES, MICRO_BATCH, SEQ, seed=100)
    for layout in LAYOUTS:
        split = ParallelLayout(pipeline_parallel=2, virtual_pipeline_stages=2, pipeline_layout=layout)
        init_distributed_cpu(split, rank=rank, world_size=world, init_method=f"file://{init_file}")
        chunks = [build_k2_model(cfg, layout=split, vp_stage=v) for v in range(2)]
        for chunk in chunks:
            load_megatron_state_dict(chunk, full)
        parallel = train_step_losses(chunks, batches, SEQ, MICRO_BATCH)
        layers = [(layer.layer_number, hasattr(layer.mlp, "experts")) for c in chunks for layer in c.decoder.layers]
        has_embedding = [hasattr(c, "embedding") for c in chunks]
        has_output = [hasattr(c, "output_layer") for c in chunks]
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

        init_distributed_cpu()  # same gloo world, now PP = 1 (2-way data parallel)
        single_model = build_k2_model(cfg)
        load_megatron_state_dict(single_model, full)
        single = train_step_losses(single_model, batches, SEQ, MICRO_BATCH)
        results[layout] = {"parallel": parallel, "single": single, "layers": layers, "pp_rank": pp_rank,
                           "last_stage": last_stage, "has_embedding": has_embedding, "has_output": has_output}
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.helpers.model import k2_like_tiny_config, run_gloo_bodies, saved_full_state

    tmp = tmp_path_factory.mktemp("k2_gloo_layout")
    state_path = saved_full_state(tmp, k2_like_tiny_config(num_hidden_layers=NUM_LAYERS))
    return run_gloo_bodies(_worker, 2, lambda r: (r, 2, str(tmp / "init"), state_path))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_uneven_interleaved_layout_loss_matches_single_process(layout, results):
    checked = 0
    for res in results:
        res = res[layout]
        stage = res["pp_rank"]
        assert [n for n, _ in res["layers"]] == LAYOUTS[layout][stage]
        assert all(moe == (n != 1) for n, moe in res["layers"])  # layer 1 (0-based 0) dense, the rest MoE
        # embedding in the first model chunk only, output layer in the last only
        assert res["has_embedding"] == ([True, False] if stage == 0 else [False, False])
        assert res["has_output"] == ([False, True] if stage == 1 else [False, False])
        assert len(res["single"]) == MICROBATCHES
        if not res["last_stage"]:
            assert res["parallel"] == []
            continue
        torch.testing.assert_close(torch.tensor(res["parallel"]), torch.tensor(res["single"]), rtol=LOSS_RTOL,
                                   atol=0)
        checked += 1
    assert checked == 1
