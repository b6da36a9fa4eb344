"""EP all-to-all overlapped with computation (K2 report section 4) through megatron-core's combined 1F1B schedule
(``overlap_moe_expert_parallel_comm``) with delayed expert weight gradients (``delay_wgrad_compute``).

Our side, directly: K2GroupedMLP with delayed wgrad gives the outputs, input gradients and (after backward_dw) weight
gradients of the ordinary path bit for bit, with FP8 storage and SwiGLU recompute too, hands them to megatron DDP's
hooks, and refuses a forgotten backward_dw or a DDP built without delay_wgrad_compute.
The schedule, on gloo: EP2 (the non-pipelined combined 1F1B) and PP2 x 2 virtual stages x EP2 (megatron overlaps
inside interleaved 1F1B only), k2-tiny in bf16 (megatron requires it), two MuonClip (ZeRO-1) steps with and without
the overlap: the losses and every gradient buffer are equal bit for bit (measured; the same operations in another
order of micro-batch halves). On the CPU megatron's communication stream and events are cpu_compat's stand-ins
(operations run in order), so what is checked is the schedule's maths, not the overlap in time.
"""

import copy
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

SEQ, MICRO_BATCH, MICROBATCHES, STEPS = 16, 2, 4, 2
# name -> (pipeline, virtual stages) with expert parallel 2 (world = 2 x pipeline)
LAYOUTS = {2: {"EP2": (1, None)}, 4: {"PP2xVPP2xEP2": (2, 2)}}


# ----- K2GroupedMLP with delayed weight gradients, in one process -----

@pytest.fixture(scope="module")
def megatron_cpu():
    from tests.helpers.model import require_no_cuda, teardown_megatron

    require_no_cuda()
    from k2_megatron.megatron import init_distributed_cpu

    init_distributed_cpu()
    yield
    teardown_megatron()


def _experts(delay: bool, *, fp8: bool = False, recompute: bool = False, like=None):
    """k2-tiny's 8 experts on one rank (bf16); with the weights of ``like`` when given."""
    from k2_megatron.config import get_preset
    from k2_megatron.megatron import to_transformer_config
    from k2_megatron.megatron.moe import K2GroupedMLP

    config = copy.copy(to_transformer_config(get_preset("k2-tiny"), params_dtype=torch.bfloat16))
    # megatron accepts delay_wgrad_compute only with the EP overlap (EP > 1): set it past its checks
    config.delay_wgrad_compute = delay
    if recompute:
        config.recompute_granularity, config.recompute_modules = "selective", ["moe_act"]
    experts = K2GroupedMLP(config.num_moe_experts, config)
    experts.fp8_activation_storage = fp8
    if like is not None:
        experts.load_state_dict(like.state_dict())
    return experts


def _inputs(experts, seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([5, 0, 3, 7, 1, 0, 4, 2])  # experts without tokens included
    x = torch.randn(int(sizes.sum()), experts.config.hidden_size, generator=g).bfloat16().requires_grad_()
    probs = torch.rand(x.shape[0], generator=g)
    dy = torch.randn(x.shape, generator=g).bfloat16()
    return x, sizes, probs, dy


def _run(experts, seeds, *, call_backward_dw: bool = True):
    """Forward + backward of a micro-batch per seed (weight gradients accumulate); outputs and input gradients."""
    outs = []
    for seed in seeds:
        x, sizes, probs, dy = _inputs(experts, seed)
        y, _ = experts(x, sizes, probs)
        y.backward(dy)
        if call_backward_dw:
            experts.backward_dw()
        outs.append((y.detach(), x.grad))
    return outs


@pytest.mark.parametrize("fp8,recompute", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["bf16", "fp8", "recompute", "fp8+recompute"])
def test_delayed_wgrad_equals_the_ordinary_backward(megatron_cpu, fp8, recompute):
    ordinary = _experts(False, fp8=fp8, recompute=recompute)
    delayed = _experts(True, fp8=fp8, recompute=recompute, like=ordinary)
    want = _run(ordinary, [1, 2])
    x, sizes, probs, dy = _inputs(delayed, 1)
    y, _ = delayed(x, sizes, probs)
    y.backward(dy)
    assert all(p.grad is None for p in delayed.parameters())  # no weight gradient before backward_dw
    delayed.backward_dw()
    got = [(y.detach(), x.grad)] + _run(delayed, [2])
    for (y_want, dx_want), (y_got, dx_got) in zip(want, got):
        assert torch.equal(y_got, y_want) and torch.equal(dx_got, dx_want)
    for (name, p), q in zip(delayed.named_parameters(), ordinary.parameters()):
        assert p.grad is not None and q.grad.abs().sum() > 0, name
        assert torch.equal(p.grad, q.grad), name  # accumulated over the two micro-batches alike


def test_delayed_wgrad_goes_through_the_ddp_hooks(megatron_cpu):
    """megatron DDP (delay_wgrad_compute=True) registers one hook per weight marked skip_backward_post_hook; each
    moves the weight's .grad into its buffer, called by backward_dw as soon as that weight's gradient is set."""
    ordinary = _experts(False)
    delayed = _experts(True, like=ordinary)
    assert all(p.skip_backward_post_hook for p in delayed.parameters())
    assert not any(p.skip_backward_post_hook for p in ordinary.parameters())
    _run(ordinary, [3])
    buffers = {p: torch.zeros_like(p, dtype=torch.float32) for p in delayed.parameters()}
    seen = []

    def hook_for(p):
        def hook():
            seen.append(p.grad is not None)
            buffers[p].add_(p.grad)
            p.grad = None
        return hook

    for p in delayed.parameters():
        delayed.register_wgrad_accumulation_and_reduce_hooks(hook_for(p))
    _run(delayed, [3])
    assert seen == [True, True]
    for p, q in zip(delayed.parameters(), ordinary.parameters()):
        assert p.grad is None and torch.equal(buffers[p], q.grad.float())


def test_backward_dw_holds_one_weight_gradient_at_a_time(megatron_cpu):
    """Each weight's gradient goes to DDP (whose hook adds it to the buffer and frees it) before the next weight's is
    computed: two expert weight gradients at once (fc1's and fc2's, in the model's dtype: ~2 GiB per K2 layer at
    EP16) would be the peak of a rank's backward. The hooks are megatron DDP's, one per weight in parameter order."""
    experts = _experts(True)
    held = []

    def hook_for(p):
        def hook():
            held.append([q.grad is not None for q in experts.parameters()])
            p.grad = None
        return hook

    for p in experts.parameters():
        experts.register_wgrad_accumulation_and_reduce_hooks(hook_for(p))
    _run(experts, [7])
    assert held == [[False, True], [True, False]]  # fc2's backward ran first: its gradient first, then fc1's


def test_delayed_wgrad_refuses_what_would_lose_gradients(megatron_cpu):
    experts = _experts(True)
    _run(experts, [4], call_backward_dw=False)
    with pytest.raises(RuntimeError, match=r"weight gradients of the last backward are still pending: call "
                                           r"backward_dw\(\)"):
        _run(experts, [5])
    experts.backward_dw()
    for p in experts.parameters():  # as megatron DDP leaves them when built without delay_wgrad_compute
        p.main_grad, p.grad = torch.zeros_like(p, dtype=torch.float32), None
    _run(experts, [6], call_backward_dw=False)
    with pytest.raises(RuntimeError, match=r"DistributedDataParallelConfig\(delay_wgrad_compute=False\)"):
        experts.backward_dw()


def test_evaluation_forward_runs_without_delayed_state(megatron_cpu):
    experts = _experts(True)
    x, sizes, probs, _ = _inputs(experts, 7)
    with torch.no_grad():
        y, _ = experts(x, sizes, probs)
    assert not experts._pending_wgrad and y.shape == x.shape


# ----- megatron's combined 1F1B on gloo -----

def _train(cfg, full, layout, overlap: bool) -> dict:
    """STEPS MuonClip steps of this rank's bf16 k2-tiny chunks: per-step losses, the gradient buffers of the first
    step, and how many delayed expert weight gradients backward_dw computed."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.module import Float16Module

    from k2_megatron.megatron.moe import K2GroupedMLP
    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer
    from tests.helpers.model import loaded_k2_model, make_batches, train_step_losses

    chunks = []
    vpp = layout.virtual_pipeline_stages
    for vp in range(vpp or 1):
        model = loaded_k2_model(cfg, full, layout=layout, vp_stage=vp if vpp else None, params_dtype=torch.bfloat16,
                                overlap_moe_expert_parallel_comm=overlap, delay_wgrad_compute=overlap)
        model.config.finalize_model_grads_func = finalize_model_grads
        chunks.append(DistributedDataParallel(model.config, DistributedDataParallelConfig(
            use_distributed_optimizer=True, grad_reduce_in_fp32=True, bucket_size=None, delay_wgrad_compute=overlap),
            Float16Module(model.config, model)))
    opt = get_muonclip_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, bf16=True, clip_grad=0.0,
                                                 use_distributed_optimizer=True), chunks,
                                 MuonClipConfig(ns_dtype=torch.float32))
    delayed = [0]
    original = K2GroupedMLP.backward_dw

    def counting_backward_dw(self):
        delayed[0] += len(self._pending_wgrad)
        original(self)

    K2GroupedMLP.backward_dw = counting_backward_dw
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    losses, grads = [], None
    try:
        for step in range(STEPS):
            for c in chunks:
                c.zero_grad_buffer()
            opt.zero_grad()
            batches = make_batches(cfg, MICROBATCHES * dp, MICRO_BATCH, SEQ, seed=50 + step)[dp_rank::dp]
            losses.append(train_step_losses(chunks if vpp else chunks[0], batches, SEQ, MICRO_BATCH))
            if grads is None:
                grads = {f"{i}.{n}": p.main_grad.clone() for i, c in enumerate(chunks)
                         for n, p in c.module.named_parameters()}
            assert opt.step()[0]
    finally:
        K2GroupedMLP.backward_dw = original
    return {"losses": losses, "grads": grads, "delayed": delayed[0]}


def _rank(rank, world, init_file, state_path) -> dict:
    """{(layout, overlap): _train(...)} of this rank for the layouts of its world size."""
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import init_distributed_cpu
    from tests.helpers.model import k2_like_tiny_config

    cfg, full, out = k2_like_tiny_config(), torch.load(state_path), {}
    for name, (pp, vpp) in LAYOUTS[world].items():
        layout = ParallelLayout(pipeline_parallel=pp, virtual_pipeline_stages=vpp, expert_parallel=2)
        for overlap in (False, True):
            init_distributed_cpu(layout, rank=rank, world_size=world, init_method=f"file://{init_file}")
            out[(name, overlap)] = _train(cfg, full, layout, overlap)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers.model import k2_like_tiny_config, run_gloo_bodies, saved_full_state

    tmp = tmp_path_factory.mktemp("ep_overlap")
    state_path = saved_full_state(tmp, k2_like_tiny_config())
    return {world: run_gloo_bodies(_rank, world, lambda r, world=world: (r, world, str(tmp / f"init_{world}"),
                                                                         state_path), timeout=600)
            for world in LAYOUTS}


ALL = [(w, n) for w, layouts in LAYOUTS.items() for n in layouts]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world,layout", ALL, ids=[n for _, n in ALL])
def test_overlap_gives_the_same_losses_and_gradients(runs, world, layout):
    last_stage_losses = 0
    for rank, result in enumerate(runs[world]):
        plain, overlapped = result[(layout, False)], result[(layout, True)]
        assert overlapped["losses"] == plain["losses"], rank
        last_stage_losses += sum(len(step) for step in plain["losses"])
        assert overlapped["grads"].keys() == plain["grads"].keys()
        for name, g in plain["grads"].items():
            assert torch.equal(overlapped["grads"][name], g), (rank, name)
        # the delayed path ran: two expert GEMMs per MoE layer, micro-batch and step on every rank with MoE layers
        assert plain["delayed"] == 0 and overlapped["delayed"] > 0, rank
    assert last_stage_losses == STEPS * MICROBATCHES * 2  # two data-parallel ranks on the last stage
