"""Host synchronisations on CUDA tensors, where they happen, and the one list of those that are allowed.

On a GPU the host runs ahead of the device; reading a device value on the host (``.item()``, ``float()``, ``bool()``,
``.tolist()``, ``.cpu()`` / ``.to("cpu")``), an operator whose output shape depends on device values (``nonzero``,
boolean-mask indexing), or waiting for a stream, an event or the device makes it wait, and the GPU idles until the
host has queued more work. The rehearsal sees each one (``HostSyncTrace``, fed by ``RehearsalMode`` and by the
fake-CUDA patches) with the code location that caused it.

Fake tensors carry no values, so a value read on the host is made up: an allowed synchronisation may declare the value
the rehearsal answers (e.g. a gradient norm above the clipping threshold, so that clipping runs); any other read
answers True for a boolean and 0 for a number (predicates such as "all gradients are finite" hold, counts and flags
are zero).

ALLOWED_SYNCS is the documented list of the synchronisations a training step may make; everything else is reported
as unexpected (and ``RehearsalReport.check()`` fails on it).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch

from k2_megatron.rehearsal.sites import CallSite, call_site


@dataclasses.dataclass(frozen=True)
class AllowedSync:
    """A host synchronisation a step may make: matched on the issuing frame (file suffix and function), or, for the
    synchronisations the fake-CUDA patches stand for, on what they report (``detail``)."""

    name: str
    why: str            # why it is needed, and how often it happens
    file: str = ""      # path suffix of the issuing file (megatron-core's or ours)
    function: str = ""  # function name in that file
    detail: str = ""    # text of the reported detail
    value: float | bool | None = None  # the scalar the rehearsal answers for a value read here (None: the default)

    def matches(self, site: CallSite, detail: str) -> bool:
        if self.detail:
            return self.detail in detail
        return site.matches(self.file, self.function)


ALLOWED_SYNCS: tuple[AllowedSync, ...] = (
    AllowedSync("MoE all-to-all token counts",
                "the expert-parallel all-to-all needs its split sizes on the host: megatron copies the token counts "
                "to the host on a side stream and waits for them before the exchange (one copy and one wait per MoE "
                "layer per micro-batch forward; K2's dropless routing makes the sizes data-dependent)",
                detail="MoE all-to-all token counts"),
    AllowedSync("activation offload summary",
                "megatron's fine-grained activation offloading (memory.cpu_offload) ends its warm-up step by gathering "
                "every rank's offloaded bytes per module (two all_gather_object) and printing them on rank 0: once "
                "per run, after the first step",
                file="megatron/core/pipeline_parallel/fine_grained_activation_offload.py",
                function="print_offload_summary_table"),
    AllowedSync("gradient norm",
                "gradient clipping scales by clip / norm only when the global norm exceeds the threshold, a host "
                "decision (once per optimizer step); the rehearsal answers a squared norm of 1e6, above any "
                "clipping threshold, so that the clipping branch runs",
                file="megatron/core/optimizer/clip_grads.py", function="get_grad_norm_fp32", value=1.0e6),
    AllowedSync("non-finite check",
                "MuonClip's step decision: whether any rank's gradient buffers or max logits hold inf / NaN (checked "
                "on the device in pieces within memory.muon_buffer_mib) and whether every attention layer recorded "
                "max logits, agreed over ranks and read on the host in one transfer (once per optimizer step)",
                file="k2_megatron/megatron/optimizer.py", function="_agree"),
    AllowedSync("QK-Clip max logits finite",
                "QK-Clip refuses to scale weights by non-finite max logits: one read for all attention layers of a "
                "MuonClip (once per optimizer step; the rehearsal answers finite)",
                file="k2_megatron/optim/muonclip.py", function="_collect_max_logits", value=1.0),
    AllowedSync("step figures",
                "the step's loss (sum and count of the last stage's micro-batch losses over the world) and, at logged "
                "steps, the per-layer max logits, clipped heads and expert loads (one table over the pipeline "
                "group) are read on the host in one transfer once per step, after the optimizer step has been queued; "
                "the rehearsal answers 1.0 for every value",
                file="k2_megatron/training/trainer.py", function="step_metrics", value=1.0),
    AllowedSync("validation loss",
                "the validation loss (sum and count over the world) is read on the host once per validation; the "
                "rehearsal answers 1.0 for the loss and the count",
                file="k2_megatron/training/trainer.py", function="global_mean", value=1.0),
    AllowedSync("optimizer state to host",
                "with memory.optimizer_state_on_host the step writes every updated piece of the master weights and "
                "Muon / AdamW state back to pinned host memory with non_blocking copies queued on the stream: on a GPU "
                "the host does not wait for them (the rehearsal's pin_memory leaves tensors pageable, so it sees each "
                "piece as a device-to-host copy)",
                file="k2_megatron/megatron/host_state.py", function="_to_host"),
    AllowedSync("optimizer state on host, before a checkpoint",
                "with memory.optimizer_state_on_host a checkpoint's save or load first waits for the last step's "
                "copies of the state to the host (at save and load steps only)",
                file="k2_megatron/megatron/host_state.py", function="wait_for_host_state"),
    AllowedSync("checkpoint shards to host",
                "writing a checkpoint stages every shard this rank writes in host memory (at save steps only)",
                detail="checkpoint: "),
)

# Phases of a training step: a synchronisation there that no allowed entry covers fails the rehearsal. Setup
# (model and optimizer construction) is reported but not held to the list.
STEP_PHASES = ("forward-backward", "optimizer step", "step metrics", "checkpoint save (dry)")

HOST_VALUE = "host value of device data"  # a read of a host copy: the copy was the synchronisation


@dataclasses.dataclass
class HostSync:
    kind: str          # "value read", "device-to-host copy", "data-dependent shape", "stream/event synchronize", ...
    detail: str        # what was read (dtype and shape) or waited for
    site: CallSite
    phase: str
    allowed: AllowedSync | None
    count: int = 1     # element reads merged into one (a .tolist() reads every element)


def allowed_sync(site: CallSite, detail: str) -> AllowedSync | None:
    return next((a for a in ALLOWED_SYNCS if a.matches(site, detail)), None)


class HostSyncTrace:
    def __init__(self):
        self.events: list[HostSync] = []
        self.phase = ""
        self._last_read = None  # (site, storage id) of the last value read, to merge the element reads of a tolist

    def record(self, kind: str, detail: str, count: int = 1, *, merge_key=None) -> HostSync:
        site = call_site()
        if merge_key is not None and self._last_read == (site, merge_key) and self.events:
            self.events[-1].count += 1
            return self.events[-1]
        event = HostSync(kind, detail, site, self.phase, allowed_sync(site, detail), count)
        self.events.append(event)
        self._last_read = (site, merge_key) if merge_key is not None else None
        return event

    def value_read(self, tensor, storage_key) -> float | bool | int:
        """A scalar read of a fake tensor: records it (a read of a fake host tensor, whose values came from the
        device, is recorded as such, not as a synchronisation) and returns the value the code sees."""
        kind = "value read" if tensor.device.type == "cuda" else HOST_VALUE
        event = self.record(kind, f"{str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)} "
                            f"on {tensor.device.type}", merge_key=storage_key)
        is_bool = tensor.dtype == torch.bool
        if event.allowed is not None and event.allowed.value is not None:
            value = event.allowed.value
        else:
            value = is_bool  # True for a predicate, 0 for a number
        if is_bool:
            return bool(value)
        return float(value) if tensor.dtype.is_floating_point else int(value)

    def unexpected(self) -> list[HostSync]:
        """Synchronisations of the step's phases that no allowed entry covers."""
        return [e for e in self.events if is_unexpected(e.phase, e.kind, e.allowed)]

    def summary(self) -> list[dict]:
        """One row per (phase, kind, site): occurrences, and the allowed entry when there is one."""
        counts: Counter = Counter()
        first: dict = {}
        for e in self.events:
            key = (e.phase, e.kind, str(e.site))
            counts[key] += e.count
            first.setdefault(key, e)
        return [{"phase": k[0], "kind": k[1], "site": k[2], "code": (first[k].site.issuer.code),
                 "detail": first[k].detail, "count": n,
                 "allowed": first[k].allowed.name if first[k].allowed else None,
                 "unexpected": is_unexpected(k[0], k[1], first[k].allowed)} for k, n in counts.items()]


def is_unexpected(phase: str, kind: str, allowed: AllowedSync | None) -> bool:
    return allowed is None and phase in STEP_PHASES and kind != HOST_VALUE
