"""The dry-run planner: its parameter formulas against a real megatron-core K2 model, and the full K2 layout on a
simulated world of 256 ranks against the K2 report's accounting, without allocating memory."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from k2_megatron.config import ConfigError, load_config
from k2_megatron.config import ParallelLayout
from k2_megatron.training.plan import dry_run, layer_params, plan_memory

from tests.helpers import REPO_ROOT

CONFIGS = str(REPO_ROOT / "examples" / "configs")


def test_parameter_formulas_match_the_real_model():
    """Every parameter of a megatron-core k2-tiny (dense layer 0, MoE layers 1-3, embedding, head) is counted."""
    from tests.helpers.model import require_no_cuda, teardown_megatron

    require_no_cuda()
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu
    from k2_megatron.config import get_preset

    cfg = get_preset("k2-tiny")
    init_distributed_cpu()
    try:
        model = build_k2_model(cfg)
    finally:
        teardown_megatron()
    per_layer: dict[int, int] = {}
    other = 0
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            layer = int(name.split(".")[2])
            per_layer[layer] = per_layer.get(layer, 0) + p.numel()
        else:
            other += p.numel()
    for layer in range(cfg.num_hidden_layers):
        lp = layer_params(cfg, layer)
        assert per_layer[layer] == lp.dense + lp.router + lp.experts, layer
    assert other == 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size  # embedding, output layer, final norm
    plan = plan_memory(load_config(None, ["model.overrides.vocab_size=1024"]), 1)
    assert plan.total_params == sum(p.numel() for p in model.parameters())
    assert plan.stages[0].params == plan.total_params


def test_layer_splits():
    assert ParallelLayout(pipeline_parallel=2).chunk_layers(4) == [2, 2]
    assert ParallelLayout(pipeline_parallel=2, virtual_pipeline_stages=2).chunk_layers(4) == [1, 1, 1, 1]
    assert ParallelLayout(pipeline_parallel=16, first_stage_layers=3, last_stage_layers=2).chunk_layers(61) == (
        [3] + [4] * 14 + [2])
    chunks = ParallelLayout(pipeline_parallel=16, virtual_pipeline_stages=2, pipeline_layout="auto").chunk_layers(61)
    assert sum(chunks) == 61 and len(chunks) == 32 and sorted(set(chunks)) == [1, 2]
    assert chunks[0] == 1 and chunks[-1] == 1  # the short chunks carry the embedding and the output layer


def test_k2_full_dry_run_on_256_ranks_matches_the_paper_without_allocating(capsys):
    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"))
    import psutil

    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        assert dry_run(cfg, world_size=256) == 0  # K2's memory section: fits an 80 GB H100 (as rehearsed)
        plan = plan_memory(cfg, 256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20 and psutil.Process().memory_info().rss - rss < 200 * 2**20  # nothing real built
    out = capsys.readouterr().out
    assert "world 256 = TP1 x PP16 x 2 virtual stages x DP16" in out and "K2 report" in out
    assert len(plan.stages) == 16 and plan.model_parallel_group == 256 and plan.expert_dp == 1
    assert sum(len(s.layers) for s in plan.stages) == 61
    # 1.04T total / 32.6B activated (the report), within 2%
    assert plan.total_params == pytest.approx(1.04e12, rel=0.02)
    assert plan.active_params == pytest.approx(32.6e9, rel=0.02)
    # bf16 weights + fp32 gradient buffers: ~6 TB over the 256-GPU group, ~30 GB per GPU (report, section 4)
    total = plan.weights_and_grads_per_model_copy()
    assert 5e12 < total < 8e12
    per_gpu = [s.weights + s.grads for s in plan.stages]
    assert all(20e9 < b < 35e9 for b in per_gpu)
    # ZeRO-1: the optimizer state per rank shrinks with a larger world (experts sharded over expert-DP)
    bigger = plan_memory(cfg, 2048)
    assert bigger.expert_dp == 8 and bigger.stages[1].optimizer_host < plan.stages[1].optimizer_host / 4


def test_dry_run_command_line(capsys):
    from k2_megatron.training.pretrain import main

    assert main(["--config", os.path.join(CONFIGS, "k2_full.yaml"), "--dry-run", "--world-size", "512",
                 "memory.device_memory_gib=1000"]) == 0
    assert "world 512 = TP1 x PP16 x 2 virtual stages x DP32" in capsys.readouterr().out
    assert main(["--config", os.path.join(CONFIGS, "k2_full.yaml"), "--dry-run", "--world-size", "512"]) == 0
    capsys.readouterr()
    # without the activation offload it does not fit, at any world size (the activations alone exceed 80 GB)
    assert main(["--config", os.path.join(CONFIGS, "k2_full.yaml"), "--dry-run", "--world-size", "512",
                 "memory.cpu_offload=[]"]) == 2
    assert "k2-pretrain: does not fit: stage 1 needs" in capsys.readouterr().err
    assert main(["--dry-run", "memory.device_memory_gib=0"]) == 2
    assert "config error: memory.device_memory_gib: must be a number > 0, got 0" in capsys.readouterr().err
    assert main(["--dry-run", "memory.muon_buffer_mib=0"]) == 2
    assert "config error: memory.muon_buffer_mib: must be an int >= 1, got 0" in capsys.readouterr().err
    assert main(["--dry-run", "memory.optimizer_state_on_host=1"]) == 2
    assert "config error: memory.optimizer_state_on_host" in capsys.readouterr().err
    assert main(["--dry-run", "train.iters=0"]) == 2
    assert "config error: train.iters: must be an int >= 1" in capsys.readouterr().err


def test_optimizer_state_on_host_moves_it_off_the_device(capsys):
    """memory.optimizer_state_on_host: the optimizer state (master copy and MuonClip state) is counted in host memory
    instead of on the device, the same bytes; the temporaries gain the streamed pieces (at most the budget), less than
    Muon's gather span on k2_full."""
    from k2_megatron.config.memory import STREAMED_BYTES_PER_ELEMENT
    from k2_megatron.training.plan import GIB, GradBuffer, optimizer_temporary_bytes

    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"), ["memory.optimizer_state_on_host=false"])
    on = load_config(os.path.join(CONFIGS, "k2_full.yaml"))  # the recipe keeps it on the host (32 nodes)
    assert on.memory.optimizer_state_on_host
    device, host = plan_memory(cfg, 256), plan_memory(on, 256)
    for d, h in zip(device.stages, host.stages):
        assert h.optimizer == 0 and d.optimizer_host == 0
        assert h.optimizer_host == d.optimizer > 16 * GIB
        assert h.optimizer_temps == d.optimizer_temps and h.total == pytest.approx(d.total - d.optimizer)
    assert max(s.optimizer_host for s in host.stages) / GIB == pytest.approx(31.8, abs=0.05)  # expert-DP 1
    dry_run(on, world_size=256)
    assert "optimizer state in pinned host memory" in capsys.readouterr().out
    budget = 2**20
    # a rank's shard of its largest parameter, or a piece of the budget's elements
    for buffer, streamed in ((GradBuffer(numel=10**4, shards=2, largest_param=10**4, largest_matrix=1), 16 * 5000),
                             (GradBuffer(numel=10**9, shards=1, largest_param=10**8, largest_matrix=1), budget)):
        off = optimizer_temporary_bytes([buffer], 1, budget)
        assert optimizer_temporary_bytes([buffer], 1, budget, state_on_host=True) == max(off, streamed)
    assert STREAMED_BYTES_PER_ELEMENT == 16  # AdamW: master, two moments, its denominator (fp32)


def test_dry_run_errors():
    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"))
    with pytest.raises(ConfigError, match="not a positive multiple of TP x PP = 16"):
        plan_memory(cfg, 100)
    with pytest.raises(ConfigError, match="parallel.expert=16 must divide DP x TP = 1 x 1"):
        plan_memory(cfg, 16)


def test_dry_run_refuses_what_does_not_fit(capsys):
    """The total per rank is every category's bytes; a layout needing more than the device's memory is refused
    with the bytes per category; the same layout on a larger device, and k2-tiny on the default 80 GiB, pass."""
    from k2_megatron.training.plan import GIB

    # K2's memory section less the offloads (activations and optimizer state)
    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"), ["memory.cpu_offload=[]",
                                                                "memory.optimizer_state_on_host=false"])
    plan = plan_memory(cfg, 256)
    big = plan.largest()
    cats = big.categories()
    assert big.total == sum(cats.values()) and all(v > 0 for v in cats.values())
    assert big.total == max(s.total for s in plan.stages) and big.total > 80 * GIB
    assert big.total == (big.weights + big.grads + big.optimizer + big.optimizer_temps + big.comm
                         + big.activations_configured)
    assert dry_run(cfg, world_size=256) == 2
    err = capsys.readouterr().err
    assert f"stage {big.stage} needs {big.total / GIB:.1f} GiB per rank, more than the device's 79.6 GiB" in err
    for name, b in cats.items():
        assert f"{name} {b / GIB:.1f}" in err
    roomy = load_config(os.path.join(CONFIGS, "k2_full.yaml"), ["memory.cpu_offload=[]",
                                                                 "memory.optimizer_state_on_host=false",
                                                                 f"memory.device_memory_gib={big.total / GIB + 1}"])
    assert dry_run(roomy, world_size=256) == 0 and plan_memory(roomy, 256).misfit() is None
    assert dry_run(load_config(None), world_size=1) == 0
    assert "does not fit" not in capsys.readouterr().err


def test_optimizer_temporaries_and_communication_buffers():
    """The planner's categories from their definitions: the largest of the finiteness check (7 bytes per element
    of a piece of a buffer within the budget) and Muon's per-bucket temporaries (fp32 gather buffers: the bucket
    when it and this rank's shard fit the budget, else a span of the budget's size or one matrix; plus the larger of
    the rank's reduce-scatter output and one Newton-Schulz call: 18 bytes per element of the rank's share of the
    matrices gathered, evenly dealt but for one matrix, up to the budget or one matrix), nothing for gradient clipping
    (in place, whatever the largest gradient shard); EP all-to-all send buffers
    (bf16 routed tokens; two micro-batches with the EP overlap) and the pipeline's four bf16 activation buffers."""
    from k2_megatron.config.memory import finite_check_piece
    from k2_megatron.training.plan import GradBuffer, communication_bytes, optimizer_temporary_bytes

    b = GradBuffer(numel=1000, shards=2, largest_param=300, largest_matrix=100)
    assert optimizer_temporary_bytes([b], 1, 2**20) == 4 * 1000 + 18 * (500 + 100)  # whole bucket
    assert optimizer_temporary_bytes([b], 1, 4 * 200) == 4 * 200 + 18 * 100  # spans of 200, calls of one matrix
    assert optimizer_temporary_bytes([b], 1, 4 * 50) == 4 * 100 + 18 * 100  # one matrix, larger than the budget
    alone = GradBuffer(numel=1000, shards=1, largest_param=300, largest_matrix=100)  # owns all of it
    assert optimizer_temporary_bytes([b, alone], 1, 2**20) == 4 * 1000 + 18 * 1000
    assert optimizer_temporary_bytes([b], 2, 2**20) == 4 * 1000 + 18 * 2 * (500 + 50)  # TP2: whole matrices of 2 x 50
    wide = GradBuffer(numel=10**6, shards=1, largest_param=10, largest_matrix=10)
    assert optimizer_temporary_bytes([wide], 1, 18 * 1000) == 4 * 4500 + 18 * 1000  # spans and calls in the budget
    assert finite_check_piece(4, 7000) == 1000 and finite_check_piece(4, 3) == 1  # the finiteness check's pieces
    stack = GradBuffer(numel=10**6, shards=2, largest_param=4 * 10**5, largest_matrix=10)  # one large expert stack
    assert optimizer_temporary_bytes([stack], 1, 18 * 1000) == 4 * 4500 + 18 * 1000  # clipping scales in place
    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"))
    k2 = cfg.k2_config(None)
    plan = plan_memory(cfg, 256)
    tokens, h = cfg.data.seq_length * cfg.train.micro_batch_size, k2.hidden_size
    buffer = tokens * k2.num_experts_per_tok * h * 2  # one all-to-all output of a micro-batch's routed tokens
    assert plan.stages[1].comm == 3 * buffer  # dispatch's + combine's, and the other micro-batch's with the EP overlap
    off = load_config(os.path.join(CONFIGS, "k2_full.yaml"), ["parallel.overlap_moe_expert_parallel_comm=false",
                                                              "parallel.delay_wgrad_compute=false"])
    assert communication_bytes(k2, tokens, plan.stages[1].layers, off.parallel, plan.layout) == 2 * buffer


def test_default_device_memory_is_the_rehearsed_h100s():
    from k2_megatron.rehearsal.fake_cuda import H100

    plan = plan_memory(load_config(os.path.join(CONFIGS, "k2_full.yaml")), 256)
    assert plan.device_memory == H100.total_memory == 81559 * 2**20  # torch's total_memory of an H100 SXM 80GB


def test_in_flight_peak_meets_a_backward_with_the_passes_megatron_holds():
    """The activation peak is the passes held plus the running forward's or backward's working set, in megatron's
    order: 1F1B runs a steady-state forward before its backward (both passes held while the backward works); the
    combined 1F1B schedule (EP all-to-all overlap) interleaves them layer by layer, so the backward's largest step,
    its first layer, meets only the forward's first layer (counted as the backward first)."""
    from k2_megatron.training.plan import in_flight_chunks

    # PP2, stage 0, 3 micro-batches: one warm-up forward, then (forward, backward) twice, then one backward
    assert in_flight_chunks(2, 1, 0, 3, [1.0]) == (2.0, [2])
    assert in_flight_chunks(2, 1, 0, 3, [1.0], backward_bytes=[10.0]) == (12.0, [2])
    assert in_flight_chunks(2, 1, 0, 3, [1.0], backward_bytes=[10.0], combined=True) == (11.0, [1])
    assert in_flight_chunks(2, 1, 0, 3, [1.0], forward_bytes=[5.0]) == (6.0, [1])
    # the last stage runs each forward's backward right after it: one pass held, whatever the micro-batch count
    assert in_flight_chunks(2, 1, 1, 8, [1.0], backward_bytes=[10.0]) == (11.0, [1])
    # interleaved, PP2 x 2 virtual stages, stage 0: (2 - 0 - 1) * 2 + (2 - 1) * 2 = 4 warm-up forwards in the
    # order v0, v0, v1, v1; the first backward is v1's (the last virtual stage)
    held, alive = in_flight_chunks(2, 2, 0, 4, [1.0, 100.0], backward_bytes=[0.0, 0.0])
    assert alive == [3, 2] and held == 203.0  # after the first steady-state forward (v0), before v1's backward


def test_backward_working_set_of_k2s_chunks():
    """chunk_backward_bytes on k2_full's chunks, with K2's memory section, against what the rehearsal measures
    (tests/rehearsal/test_recipes_rehearsed.py checks every chunk of the first, a middle and the last stage within
    10%): the embedding's weight gradient dominates the first chunk, the experts' rows an MoE chunk, the logits'
    gradient the last chunk; each step counts what the steps before it freed."""
    from k2_megatron.training.plan import GIB, chunk_backward_bytes, layer_backward_bytes

    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"))
    k2, options, tokens = cfg.k2_config(None), cfg.memory.options(), 4096
    kw = dict(local_experts=24, delayed_wgrad=True)
    moe = chunk_backward_bytes(k2, range(15, 17), False, False, options, tokens, **kw)
    assert moe == layer_backward_bytes(k2, 16, options, tokens, **kw)  # the chunk's last layer runs first
    assert 3.0 * GIB < moe < 3.6 * GIB  # measured 3.29 GiB
    first = chunk_backward_bytes(k2, range(0, 1), True, False, options, tokens, **kw)
    assert 1.4 * GIB < first < 1.75 * GIB  # the embedding's bf16 weight gradient less the freed layer: 1.57 measured
    last = chunk_backward_bytes(k2, range(60, 61), False, True, options, tokens, **kw)
    assert last == k2.vocab_size * tokens * 2  # the logits' gradient in bf16 beside the fp32 one: 1.25 GiB measured
    # without delayed wgrad the experts' fc1 weight gradient (bf16, 24 local experts) is part of it
    plain = layer_backward_bytes(k2, 16, options, tokens, local_experts=24, delayed_wgrad=False)
    rows = tokens * k2.num_experts_per_tok * k2.hidden_size * 2
    assert plain - moe == pytest.approx(24 * 2 * k2.moe_intermediate_size * k2.hidden_size * 2 - rows)
