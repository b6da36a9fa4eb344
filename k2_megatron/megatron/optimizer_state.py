"""MuonClip's optimizer state in model space: checkpoints that load on any parallel layout.

The state of a parameter is its fp32 master weight (``fp32_param``), its momentum / Adam first moment
(``exp_avg``) and, for AdamW parameters, the second moment (``exp_avg_sq``; a Muon parameter has none); the
optimizer has one step count. Each state tensor is saved as a global tensor named after the parameter's model key,
``optimizer.state.<name>.<model key>`` (the names megatron-core's non-distributed optimizers use), written as the
rectangles of that global tensor which this rank's piece covers (k2_megatron.megatron.sharding): a ZeRO-1 shard is
a flat range of the TP/EP-local parameter, i.e. at most a few rectangles per block. Nothing is communicated at
save or load; a checkpoint written on any TP / PP / EP / DP layout, with or without the distributed optimizer,
loads on any other (torch DCP reads each requested rectangle from the saved ones it overlaps).

megatron-core's own formats do not do this here: its DP-reshardable format names state by gradient-bucket
position (same TP/PP/EP only), its fully-reshardable format all-gathers the state over the data-parallel group at
save, and its model-space format uses ShardedTensor.flattened_range, which its dist_checkpointing refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2_megatron.megatron.sharding import parameter_blocks

PREFIX = "optimizer.state"
FORMAT = "k2_model_space"


@dataclass
class _ParameterState:
    """One model parameter's optimizer state on this rank: elements [start, end) of the flattened local
    parameter, as flat tensors of end - start elements."""

    param: torch.nn.Parameter
    start: int
    end: int
    tensors: dict[str, torch.Tensor]  # fp32_param, exp_avg[, exp_avg_sq]
    dp_sharded: bool  # a ZeRO-1 shard (the data-parallel ranks hold different pieces)


def _parameter_states(sub) -> list[_ParameterState]:
    """The states held by one MuonClip sub-optimizer (k2_megatron.megatron.optimizer's wrappers)."""
    if sub.optimizer is None:
        return []
    use_muon = {id(p): g["use_muon"] for g in sub.optimizer.param_groups for p in g["params"]}
    out = []
    for main, model in sub.main_to_model.items():
        state = sub.optimizer.state[main]
        tensors = {"fp32_param": main.detach().view(-1), "exp_avg": state["exp_avg"].view(-1)}
        if not use_muon[id(main)]:
            tensors["exp_avg_sq"] = state["exp_avg_sq"].view(-1)
        start = sub._first_element(model)
        out.append(_ParameterState(model, start, start + main.numel(), tensors, sub.dp_sharded))
    return out


def _replica_id(block_replica_id, dp_sharded: bool):
    """A piece's replica id: the block's (megatron's (pipeline, tensor, data) triple), with the data-parallel
    coordinate 0 when each data-parallel rank holds its own piece."""
    if not dp_sharded:
        return block_replica_id
    if not (isinstance(block_replica_id, tuple) and len(block_replica_id) == 3):
        raise ValueError(f"expected megatron's (PP, TP, DP) replica id, got {block_replica_id!r}")
    return (*block_replica_id[:2], 0)


def step_count(subs) -> int:
    """The optimizer step count, which every parameter group of every sub-optimizer shares."""
    steps = {int(g.get("step", 0)) for sub in subs if sub.optimizer is not None for g in sub.optimizer.param_groups}
    if len(steps) > 1:
        raise ValueError(f"MuonClip: parameter groups disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def sharded_state_dict(subs, model_sharded_state_dict) -> dict:
    """The sharded state dict of the sub-optimizers' state (for saving, and for loading in place: its tensors are
    views of the live state)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    states = [s for sub in subs for s in _parameter_states(sub)]
    blocks = parameter_blocks(model_sharded_state_dict, [s.param for s in states])
    pieces: dict[str, list] = {}
    for s in states:
        for block in blocks[s.param]:
            replica_id = _replica_id(block.replica_id, s.dp_sharded)
            for offset, shape, first, end in block.pieces(s.start, s.end):
                for name, flat in s.tensors.items():
                    key = f"{PREFIX}.{name}.{block.key}"
                    data = flat[first - s.start:end - s.start].view(shape)
                    pieces.setdefault(key, []).append(ShardedTensor(
                        key=key, data=data, dtype=data.dtype, local_shape=shape, global_shape=block.global_shape,
                        global_offset=offset, axis_fragmentations=None, replica_id=replica_id))
    return {"format": FORMAT, "step": step_count(subs), "param_state": pieces}


@torch.no_grad()
def load_state_dict(subs, loaded: dict) -> None:
    """Completes a load of ``sharded_state_dict``'s tensors (read in place) by setting the step count."""
    if loaded.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} optimizer state (format {loaded.get('format')!r})")
    step = int(loaded["step"])
    for sub in subs:
        if sub.optimizer is None:
            continue
        for group in sub.optimizer.param_groups:
            group["step"] = step
        for state in sub.optimizer.state.values():
            state["step"] = torch.tensor(float(step))


__all__ = ["FORMAT", "PREFIX", "load_state_dict", "sharded_state_dict", "step_count"]
