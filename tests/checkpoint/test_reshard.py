"""A pretraining checkpoint moves between parallel layouts with model and optimizer state exact
(k2_megatron.checkpoint.megatron + k2_megatron.megatron.optimizer_state).

k2-tiny in bf16 with fp32 master weights, ZeRO-1 MuonClip as in k2-pretrain. One process trains a step (momentum,
Adam moments, master weights that bf16 rounds, step 1) and saves C1; its whole state, read directly from the
optimizer (one process: every parameter is whole), is the reference. A chain of layouts then loads the previous
checkpoint and saves its own: 1 process -> TP2 -> PP2 -> EP2 -> DP2 (2 processes) -> TP2xPP2 -> PP2xEP2 -> DP4xEP2
-> TP2xEP2 (4 processes). On every layout, right after the load, each rank's fp32 master shard must round to
exactly its bf16 model parameters (which megatron's own model loader placed): a misplaced piece of optimizer
state would not. Finally one process loads every checkpoint of the chain: model, master weights, momentum, Adam
moments and step must equal the reference bit for bit. Also the weights-only load.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# name -> (tensor, pipeline, expert parallel) for the world size that runs it, in chain order
CHAIN = {2: {"TP2": (2, 1, 1), "PP2": (1, 2, 1), "EP2": (1, 1, 2), "DP2": (1, 1, 1)},
         4: {"TP2xPP2": (2, 2, 1), "PP2xEP2": (1, 2, 2), "DP4xEP2": (1, 1, 2), "TP2xEP2": (2, 1, 2)}}


def _master_mismatches(opt) -> dict:
    """Parameters whose fp32 master shard on this rank does not round to its bf16 model elements."""
    bad = {}
    for sub in opt.chained_optimizers:
        for main, param in sub.main_to_model.items():
            start = sub._first_element(param)
            model = param.detach().view(-1)[start:start + main.numel()]
            n = int((main.detach().view(-1).to(torch.bfloat16) != model).sum())
            if n:
                bad[tuple(param.shape)] = n
    return bad


def _run(rank, world, init_file, tmp):
    from tests.helpers.pretraining import build_zero1_bf16, train_step, whole_state
    from k2_megatron.checkpoint.megatron import load_checkpoint, save_checkpoint
    from k2_megatron.config import ParallelLayout

    out = {}
    if world == 1 and not os.path.exists(os.path.join(tmp, "C1")):  # the reference
        cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
        train_step(cfg, chunks, opt)
        save_checkpoint(os.path.join(tmp, "C1"), 1, chunks, opt, {})
        out["reference"] = whole_state(chunks, opt)
    elif world == 1:  # every checkpoint of the chain, loaded by one process
        for name in ["C1", *CHAIN[2], *CHAIN[4]]:
            cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=2)
            load_checkpoint(os.path.join(tmp, name, "iter_0000001"), chunks, opt, {})
            out[name] = whole_state(chunks, opt)
        # weights only: the model; the optimizer restarts from it
        cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=2)
        load_checkpoint(os.path.join(tmp, "C1", "iter_0000001"), chunks, opt, {}, weights_only=True)
        out["weights_only"] = whole_state(chunks, opt)
    else:
        previous = "DP2" if world == 4 else "C1"
        for name, (tp, pp, ep) in CHAIN[world].items():
            layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
            cfg, chunks, opt = build_zero1_bf16(layout, rank, world, init_file, seed=3)
            load_checkpoint(os.path.join(tmp, previous, "iter_0000001"), chunks, opt, {})
            out[name] = {"master_mismatches": _master_mismatches(opt)}
            save_checkpoint(os.path.join(tmp, name), 1, chunks, opt, {})
            previous = name
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from tests.helpers.model import run_gloo_bodies

    tmp = str(tmp_path_factory.mktemp("reshard"))

    def spawn(world):
        init = os.path.join(tmp, f"init{world}_{len(os.listdir(tmp))}")
        return run_gloo_bodies(_run, world, lambda r: (r, world, init, tmp), timeout=600)

    reference = spawn(1)[0]["reference"]
    moved = {world: spawn(world) for world in (2, 4)}
    loaded = spawn(1)[0]
    return reference, moved, loaded


def test_every_layout_places_the_optimizer_state_where_the_model_is(chain):
    _, moved, _ = chain
    for world, ranks in moved.items():
        for name in CHAIN[world]:
            assert [r[name]["master_mismatches"] for r in ranks] == [{}] * world, name


@pytest.mark.parametrize("name", ["C1", *CHAIN[2], *CHAIN[4]])
def test_model_and_optimizer_state_survive_every_move_exactly(chain, name):
    reference, _, loaded = chain
    got = loaded[name]
    assert sorted(got) == sorted(reference)
    kinds = {k for k, _ in reference}
    assert {"model", "fp32_param", "exp_avg", "exp_avg_sq", "step"} <= kinds
    assert int(reference[("step", "")]) == 1
    differ = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert differ == []


def test_weights_only_load_restarts_the_optimizer_from_the_weights(chain):
    reference, _, loaded = chain
    got = loaded["weights_only"]
    for (kind, name), want in reference.items():
        if kind == "model":
            assert torch.equal(got[(kind, name)], want), name
        elif kind == "fp32_param":  # the master weights come from the (bf16) model weights
            assert torch.equal(got[(kind, name)], reference[("model", name)].float()), name
        elif kind in ("exp_avg", "exp_avg_sq"):
            assert not got[(kind, name)].any(), (kind, name)
    assert int(got[("step", "")]) == 0
