"""NCCL's rules on the rehearsal's fake process group, and the record of the collectives of a step.

torch's fake process group (backend "fake") accepts anything; NCCL does not: every tensor of a collective or of a
point-to-point transfer must be a CUDA tensor. ``CollectiveTrace.on_op`` sees each c10d operator (all_reduce,
all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single, send / recv, broadcast, ...), raises
``NCCLRuleError`` for a host tensor on a group that NCCL would run (every group but those asked for as gloo), naming
the operator, the group and where in the code it was issued, and records (op, group, bytes, dtype, device, site).

bytes follows nccl-tests' convention: the tensor for all_reduce / broadcast / send / recv, the gathered output for
all-gathers, the input for reduce-scatters and all-to-alls.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.distributed as dist

from k2_megatron.rehearsal import fake_cuda
from k2_megatron.rehearsal.sites import CallSite, call_site

c10d = torch.ops.c10d

# op -> (public name, index of the argument whose bytes count, ops that are not data transfers)
_OPS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce_coalesced",
    "_allgather_base_": "all_gather_into_tensor", "allgather_": "all_gather",
    "allgather_coalesced_": "all_gather_coalesced", "allgather_into_tensor_coalesced_": "all_gather_into_tensor_coalesced",
    "_reduce_scatter_base_": "reduce_scatter_tensor", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter_tensor_coalesced",
    "alltoall_base_": "all_to_all_single", "alltoall_": "all_to_all", "broadcast_": "broadcast", "reduce_": "reduce",
    "gather_": "gather", "scatter_": "scatter", "send": "send", "recv_": "recv", "recv_any_source_": "recv",
    "barrier": "barrier", "monitored_barrier_": "monitored_barrier",
}
_OUTPUT_BYTES = {"_allgather_base_", "allgather_", "allgather_coalesced_", "allgather_into_tensor_coalesced_"}
_NO_PAYLOAD = {"barrier", "monitored_barrier_"}


class NCCLRuleError(RuntimeError):
    """A collective that NCCL would refuse (a host tensor on an NCCL group)."""


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str              # torch.distributed name, e.g. "all_reduce"
    group: str           # megatron's group description, e.g. "DATA_PARALLEL_GROUP_WITH_CP"
    group_size: int
    bytes: int
    dtype: str
    device: str
    site: CallSite
    phase: str = ""


def group_label(group) -> str:
    """megatron's description of a process group ("TENSOR_MODEL_PARALLEL_GROUP", ...), else its torch name."""
    if group is None:
        return "WORLD"
    if group is dist.group.WORLD:
        return "WORLD"
    desc = getattr(group, "group_desc", "") or ""
    return desc if desc and desc != "undefined" else f"group {group.group_name}"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _group_of(args) -> dist.ProcessGroup | None:
    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(a)
            except (RuntimeError, TypeError):
                continue
    return None


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _size_problem(name: str, args, size: int) -> str | None:
    """What the process group would refuse about the sizes of a tensor collective (as NCCL and gloo do)."""
    if name in ("_allgather_base_", "_reduce_scatter_base_", "alltoall_base_"):
        out, inp = args[0], args[1]
        if out.dtype != inp.dtype:
            return f"output dtype {out.dtype} differs from input dtype {inp.dtype}"
        if name == "_allgather_base_" and out.numel() != inp.numel() * size:
            return (f"output has {out.numel()} elements, the input's {inp.numel()} x {size} ranks = "
                    f"{inp.numel() * size} expected")
        if name == "_reduce_scatter_base_" and inp.numel() != out.numel() * size:
            return (f"input has {inp.numel()} elements, the output's {out.numel()} x {size} ranks = "
                    f"{out.numel() * size} expected")
        if name == "alltoall_base_":
            out_splits, in_splits = list(args[3]), list(args[4])
            for which, splits, t in (("output", out_splits, out), ("input", in_splits, inp)):
                if splits and (len(splits) != size or sum(splits) != t.shape[0]):
                    return (f"{which} split sizes {splits if len(splits) <= 16 else f'({len(splits)} entries)'} "
                            f"must have {size} entries summing to the {which}'s first dimension {t.shape[0]}")
            if not out_splits and not in_splits and (out.numel() != inp.numel() or inp.shape[0] % size):
                return f"even all-to-all of {tuple(inp.shape)} into {tuple(out.shape)} over {size} ranks"
    return None


class CollectiveTrace:
    """Checks and records the c10d operators dispatched while the rehearsal runs."""

    def __init__(self):
        self.records: list[Collective] = []
        self.phase = ""

    def on_op(self, func, args) -> None:
        name = func._opname if hasattr(func, "_opname") else func.__name__.split(".")[0]
        if name not in _OPS or name in _NO_PAYLOAD:
            return
        group = _group_of(args)
        label = group_label(group)
        tensors = list(_tensors(args))
        site = call_site()
        host = [t for t in tensors if t.device.type != "cuda"]
        if host and not fake_cuda.is_gloo_group(group):
            t = host[0]
            raise NCCLRuleError(
                f"NCCL error in torch.distributed.{_OPS[name]} on {label} ({group.size() if group else '?'} ranks): "
                f"a {t.device.type} tensor ({t.dtype}, shape {tuple(t.shape)}); NCCL takes CUDA tensors only (on a "
                f"GPU run: \"RuntimeError: No backend type associated with device type {t.device.type}\"). Issued at "
                f"{site}" + (f": {site.ours.code}" if site.ours is not None else f": {site.issuer.code}"))
        if not tensors:
            return
        problem = _size_problem(name, args, group.size() if group is not None else dist.get_world_size())
        if problem:
            raise NCCLRuleError(f"torch.distributed.{_OPS[name]} on {label}: {problem}. Issued at {site}: "
                                f"{(site.ours or site.issuer).code}")
        counted = (list(_tensors(args[0])) if name in _OUTPUT_BYTES
                   else list(_tensors(args[1])) if name.startswith(("_reduce_scatter", "reduce_scatter", "alltoall"))
                   else list(_tensors(args[0])))
        self.records.append(Collective(_OPS[name], label, group.size() if group is not None else dist.get_world_size(),
                                       _nbytes(counted), str(tensors[0].dtype).replace("torch.", ""),
                                       tensors[0].device.type, site, self.phase))

    def on_object_collective(self, name: str, group, obj) -> None:
        self.records.append(Collective(name, group_label(group),
                                       group.size() if group is not None else dist.get_world_size(), 0, "object",
                                       "cpu+cuda", call_site(), self.phase))

    def summary(self) -> list[dict]:
        """One row per (phase, op, group, dtype, device, issuing site): count and bytes."""
        rows: dict[tuple, dict] = {}
        for r in self.records:
            key = (r.phase, r.op, r.group, r.dtype, r.device, str(r.site))
            row = rows.setdefault(key, {"phase": r.phase, "op": r.op, "group": r.group, "group_size": r.group_size,
                                        "dtype": r.dtype, "device": r.device, "site": str(r.site), "count": 0,
                                        "bytes": 0})
            row["count"] += 1
            row["bytes"] += r.bytes
        return list(rows.values())

    def bytes_by_group(self, phase: str | None = None) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.records:
            if phase is None or r.phase == phase:
                out[r.group] += r.bytes
        return dict(out)
