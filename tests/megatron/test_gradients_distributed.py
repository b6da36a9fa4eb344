"""Gradients, not just losses: under gloo with 2 processes, every parameter's reduced gradient (megatron's main_grad
after forward_backward_func and finalize_model_grads, ZeRO-1's reduce-scattered shards gathered back) and the global
gradient norm that MuonClip's ``opt.step()`` returns equal those of one process on the whole batch.

Layouts: DP2, TP2 (+ sequence parallel), PP2, EP2 (dense DP2, experts split) and PP2 x 2 virtual stages. The
reference is k2-tiny (float32) without DDP on all microbatches: its ``.grad`` is the gradient of the mean loss
over the global batch, and its norm is computed here, in float64. Each rank's expected gradient is the reference
gradient sharded by ``load_megatron_state_dict``, the function that shards weights for these layouts (the
loss-equality tests in test_model_distributed.py check it). The optimizer clips at 1.0, the recipe's value, and
the reference norm is above it, so ``opt.step()`` computes the norm and clipping is active.

Loss-equality and parameter-equality tests cannot see a gradient that is off by a constant factor (summing instead
of averaging over data-parallel ranks, expert gradients scaled by the EP size, a replicated weight reduced twice):
cross-entropy losses do not depend on it, and Muon's orthogonalisation, Adam's normalisation and gradient clipping
cancel it. These comparisons do.
"""


import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEQ, MICRO_BATCH, MICROBATCHES = 16, 2, 4
CLIP_GRAD = 1.0  # examples/configs/k2_tiny_cpu.yaml
# name -> (tensor, pipeline, expert parallel, virtual pipeline stages)
LAYOUTS = {"DP2": (1, 1, 1, None), "TP2": (2, 1, 1, None), "PP2": (1, 2, 1, None), "EP2": (1, 1, 2, None),
           "PP2xVPP2": (1, 2, 1, 2)}
# float32; the layouts change only the summation order of reductions (PP2 is bit-identical). Measured: worst relative
# (Frobenius) error of a parameter's gradient 1.7e-6 (TP2, a q_layernorm weight, norm 0.003); of the norm 1.6e-7.
GRAD_RTOL = 1e-5
NORM_RTOL = 2e-6


def _reference(cfg, full, batches):
    """The whole batch on one process, no DDP: {name: gradient of the mean loss} and its global norm (float64)."""
    from tests.helpers.model import load_tiny_model, train_step_losses

    model = load_tiny_model(cfg, full)
    train_step_losses(model, batches, SEQ, MICRO_BATCH)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    norm = float(torch.sqrt(sum(g.double().square().sum() for g in grads.values())))
    return grads, norm


def _gather_reduced_shards(chunk) -> None:
    """ZeRO-1 leaves each data-parallel rank only its shard of every bucket reduced: gather the shards so that every
    main_grad holds the whole reduced gradient."""
    for buffer in (*chunk.buffers, *chunk.expert_parallel_buffers):
        group = buffer.data_parallel_group
        size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        for bucket in buffer.buckets:
            shard = bucket.grad_data.view(size, -1)[rank].clone()
            torch.distributed.all_gather_into_tensor(bucket.grad_data, shard, group=group)


def _gradient_errors(cfg, full, layout, vpp, chunks, ref_grads) -> dict:
    """{parameter: (relative error, norm of the expected gradient)} of this rank's main_grads against the reference
    gradients sharded for this layout."""
    from tests.helpers.model import load_tiny_model
    from megatron.core import parallel_state

    errors = {}
    for i, chunk in enumerate(chunks):
        _gather_reduced_shards(chunk)
        expected = load_tiny_model(cfg, {**full, **ref_grads}, layout, i if vpp else None)
        want = dict(expected.named_parameters())
        stage = f"pp{parallel_state.get_pipeline_model_parallel_rank()}.chunk{i}"
        for name, p in chunk.module.named_parameters():
            got, ref = p.main_grad.float(), want[name].detach()
            errors[f"{stage}.{name}"] = (float((got - ref).norm() / ref.norm().clamp_min(1e-30)), float(ref.norm()))
    return errors


def _run(rank, world, init_file, state_path) -> dict:
    from tests.helpers.model import ddp_chunks_and_muonclip, k2_like_tiny_config, make_batches, train_step_losses
    from megatron.core import parallel_state

    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import init_distributed_cpu

    cfg, full = k2_like_tiny_config(), torch.load(state_path)
    batches = make_batches(cfg, MICROBATCHES, MICRO_BATCH, SEQ, seed=11)
    init_distributed_cpu(rank=rank, world_size=world, init_method=f"file://{init_file}")
    ref_grads, ref_norm = _reference(cfg, full, batches)
    out = {"reference_norm": ref_norm}
    for name, (tp, pp, ep, vpp) in LAYOUTS.items():
        layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                virtual_pipeline_stages=vpp)
        init_distributed_cpu(layout, rank=rank, world_size=world, init_method=f"file://{init_file}")
        chunks, opt = ddp_chunks_and_muonclip(cfg, full, layout, vpp, clip_grad=CLIP_GRAD)
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        train_step_losses(chunks if vpp else chunks[0], batches[dp_rank::dp], SEQ, MICRO_BATCH)
        # before the step, which clips main_grad in place (the gathers change no rank's own shard)
        errors = _gradient_errors(cfg, full, layout, vpp, chunks, ref_grads)
        ok, grad_norm, _ = opt.step()
        out[name] = {"ok": ok, "grad_norm": grad_norm, "errors": errors}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.helpers.model import run_tiny_gloo_workers

    return run_tiny_gloo_workers(_run, 2, tmp_path_factory.mktemp("k2_gloo_grads"), timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reduced_gradients_match_single_process(layout, results):
    names = set()
    for rank, res in enumerate(results):
        errors = res[layout]["errors"]
        bad = {n: e for n, e in errors.items() if not e[0] <= GRAD_RTOL}
        assert not bad, f"rank {rank}, {layout}: (relative error, expected norm) {bad}"
        names |= {n.split(".", 2)[2] for n in errors}
    # every kind of parameter was compared, somewhere in the layout
    for part in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
                 "mlp.router.weight", "mlp.experts.linear_fc1_weight", "mlp.shared_experts.linear_fc2.weight",
                 "self_attention.linear_kv_down_proj.weight", "self_attention.kv_layernorm.weight"):
        assert any(part in n for n in names), (part, sorted(names))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_global_grad_norm_matches_single_process(layout, results):
    want = results[0]["reference_norm"]
    assert want > CLIP_GRAD  # clipping is active: the step scales the gradients by CLIP_GRAD / norm
    for rank, res in enumerate(results):
        assert res[layout]["ok"]
        got = res[layout]["grad_norm"]
        assert got is not None and abs(got - want) <= NORM_RTOL * want, (rank, got, want)
