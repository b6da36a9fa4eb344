"""K2 model under megatron-core with gloo, 2 processes: TP2 (+ sequence parallel), PP2 (even, uneven, and
interleaved with 2 virtual stages), EP2.

For each layout every rank loads the same whole state dict (sliced for its shard), runs megatron's
forward_backward_func over 4 microbatches, then rebuilds the model unsharded (TP = PP = EP = 1, the two
ranks as data parallel) and runs the same microbatches: the losses must agree. Under EP2 the two ranks
get different data, so the expert all-to-all moves uneven splits. Each sharded model (but PP2xVPP2) is
also saved with megatron's dist_checkpointing and loaded back into the unsharded model. One pair of
processes runs all layouts (process start-up and imports dominate the time on a CPU).
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEQ, MICRO_BATCH, MICROBATCHES = 16, 2, 4
# (tensor, pipeline, expert parallel, virtual pipeline stages, layers of the first pipeline stage)
LAYOUTS = {"TP2": (2, 1, 1, None, None), "PP2": (1, 2, 1, None, None), "EP2": (1, 1, 2, None, None),
           "PP2xVPP2": (1, 2, 1, 2, None), "PP2-uneven": (1, 2, 1, None, 1)}
# float32 throughout; a TP/EP/PP split only changes the summation order of a few reductions.
LOSS_RTOL = 2e-6


def _worker(rank, world, init_file, state_path, ckpt_root):
    results = {}
    from tests.helpers.model import k2_like_tiny_config, make_batches, train_step_losses
    from megatron.core import dist_checkpointing, parallel_state

    from k2_megatron.checkpoint import load_megatron_state_dict
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    cfg = k2_like_tiny_config()
    full = torch.load(state_path)
    for name, (tp, pp, ep, vpp, first) in LAYOUTS.items():
        layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                virtual_pipeline_stages=vpp, first_stage_layers=first)
        init_distributed_cpu(layout, rank=rank, world_size=world, init_method=f"file://{init_file}")
        data_seed = 100 + (parallel_state.get_data_parallel_rank() if tp == 1 and pp == 1 else 0)
        batches = make_batches(cfg, MICROBATCHES, MICRO_BATCH, SEQ, seed=data_seed)
        if vpp is None:
            chunks = [build_k2_model(cfg, layout=layout)]
        else:
            chunks = [build_k2_model(cfg, layout=layout, vp_stage=v) for v in range(vpp)]
        for chunk in chunks:
            load_megatron_state_dict(chunk, full)
        parallel = train_step_losses(chunks if vpp else chunks[0], batches, SEQ, MICRO_BATCH)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        core = chunks[0].decoder.layers[0].self_attention.core_attention
        max_logit_heads = tuple(core.current_max_attn_logits.shape)
        moe = [layer.mlp for c in chunks for layer in c.decoder.layers if hasattr(layer.mlp, "experts")]
        experts = moe[-1].experts if moe else None  # the uneven layout's first stage is the dense layer only
        local_experts = experts.linear_fc1_weight.shape[0] if moe else None
        layer_numbers = [layer.layer_number for c in chunks for layer in c.decoder.layers]
        expert_shard = None
        if experts is not None:
            sharded = experts.sharded_state_dict(prefix="experts.")["experts.linear_fc1_weight"]
            expert_shard = (tuple(sharded.global_shape), tuple(sharded.global_offset))
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        ep_rank = parallel_state.get_expert_model_parallel_rank()

        # megatron dist_checkpointing of the sharded model (our experts' sharded_state_dict included)
        ckpt = os.path.join(ckpt_root, name)
        if rank == 0:
            os.makedirs(ckpt)
        torch.distributed.barrier()
        if vpp is None:
            dist_checkpointing.save(chunks[0].sharded_state_dict(), ckpt)

        init_distributed_cpu()  # same gloo world, now TP = PP = EP = 1 (2-way data parallel)
        single_model = build_k2_model(cfg)
        if vpp is None:  # load the checkpoint written by the sharded layout
            single_model.load_state_dict(dist_checkpointing.load(single_model.sharded_state_dict(), ckpt),
                                         strict=False)
            loaded = single_model.state_dict()
            checkpoint_ok = all(torch.equal(loaded[k], v) for k, v in full.items())
        else:
            load_megatron_state_dict(single_model, full)
            checkpoint_ok = True
        single = train_step_losses(single_model, batches, SEQ, MICRO_BATCH)
        results[name] = {"parallel": parallel, "single": single, "last_stage": last_stage,
                         "max_logit_heads": max_logit_heads, "local_experts": local_experts,
                         "layer_numbers": layer_numbers, "expert_shard": expert_shard,
                         "pp_rank": pp_rank, "ep_rank": ep_rank, "checkpoint_ok": checkpoint_ok}
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.helpers.model import k2_like_tiny_config, run_gloo_bodies, saved_full_state

    tmp = tmp_path_factory.mktemp("k2_gloo")
    state_path = saved_full_state(tmp, k2_like_tiny_config())
    return run_gloo_bodies(_worker, 2, lambda r: (r, 2, str(tmp / "init"), state_path, str(tmp)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_loss_matches_single_process(layout, results):
    tp, pp, ep, vpp, first = LAYOUTS[layout]
    checked = 0
    for rank, res in enumerate(results):
        res = res[layout]
        assert res["max_logit_heads"] == (4 // tp,)  # current_max_attn_logits covers this TP rank's heads
        if res["layer_numbers"] != [1]:
            assert res["local_experts"] == 8 // ep
            # expert weights checkpoint as one global [8, 2F, H] tensor, this rank's slice at its offset
            assert res["expert_shard"] == ((8, 64, 64), (res["ep_rank"] * (8 // ep), 0, 0))
        # which global layers this rank holds (1-based): 4 layers over pp x vpp stages
        stage = res["pp_rank"]
        expected = ([1, 2, 3, 4] if pp == 1 else [1 + stage, 3 + stage] if vpp else
                    [[1], [2, 3, 4]][stage] if first == 1 else [1 + 2 * stage, 2 + 2 * stage])
        assert res["layer_numbers"] == expected
        # a torch_dist checkpoint saved by this layout loads into the unsharded model bit for bit
        assert res["checkpoint_ok"]
        assert len(res["single"]) == MICROBATCHES
        if not res["last_stage"]:
            assert res["parallel"] == []  # losses live on the last pipeline stage only
            continue
        parallel, single = torch.tensor(res["parallel"]), torch.tensor(res["single"])
        torch.testing.assert_close(parallel, single, rtol=LOSS_RTOL, atol=0)
        checked += 1
    assert checked == (1 if pp == 2 else 2)
