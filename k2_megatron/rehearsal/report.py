"""What a rehearsed rank reports: peak device memory by category next to the dry-run planner's estimate, the
collectives of the step, and its host synchronisations (allowed or not)."""

from __future__ import annotations

import dataclasses

from k2_megatron.rehearsal.memory import CATEGORIES

GIB = 1024**3

# memory category -> the dry-run planner's StagePlan field that estimates it (None: not modelled by the planner)
PLANNER_FIELDS = {"parameters": "weights", "gradient buffers": "grads", "optimizer state": "optimizer",
                  "activations": "activations_configured", "optimizer temporaries": "optimizer_temps",
                  "communication buffers": "comm", "checkpoint temporaries": None, "other": None}


class RehearsalFailed(RuntimeError):
    """The rehearsal found host synchronisations outside the allowed list."""


@dataclasses.dataclass
class RehearsalReport:
    world_size: int
    rank: int
    pipeline_rank: int
    layout: str
    device: str
    device_memory: int
    routing: str
    micro_batches: int
    peak_total: int
    peak_phase: str
    setup_peak: int          # high-water mark while the model and optimizer were built
    at_peak: dict            # category -> bytes at the moment of the peak
    category_max: dict       # category -> the category's own maximum
    planned: dict            # category -> planner bytes or None
    collectives: list        # CollectiveTrace.summary()
    syncs: list              # HostSyncTrace.summary()
    unexpected_syncs: list   # rows of ``syncs`` without an allowed entry
    checkpoint: dict
    seconds: dict            # phase -> CPU seconds the rehearsal spent in it
    replayed: int = 0        # model-chunk micro-batches replayed (k2_megatron.rehearsal.replay) instead of computed
    pinned_host: int = 0     # most pinned host bytes holding offloaded activations during the step (memory.py)
    pinned_host_planned: float | None = None  # the dry-run planner's (StagePlan.offloaded)
    host_optimizer_state: int = 0            # pinned host bytes of the optimizer state (optimizer_state_on_host)
    planned_host_optimizer_state: float = 0  # the dry-run planner's figure for it
    # per local model chunk (micro-batch replay's records): what one pass keeps and its backward's high-water mark,
    # measured ("kept", "backward_high", "forward_high") and planned ("kept_planned", "backward_planned")
    chunk_passes: list = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, r, cfg, *, checkpoint=None, micro_batches: int = 0, replayed: int = 0,
           host_optimizer_state: int = 0, chunk_passes: list = ()) -> "RehearsalReport":
        from megatron.core import parallel_state

        from k2_megatron.training.plan import plan_memory

        p = cfg.parallel
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        stage = plan_memory(cfg, r.world_size).stages[pp_rank]
        dp = r.world_size // (p.tensor * p.pipeline)
        layout = (f"TP{p.tensor} x PP{p.pipeline}{f' (x{p.virtual_stages} virtual)' if p.virtual_stages else ''} x "
                  f"DP{dp}, EP{p.expert}")
        syncs = r.syncs.summary()
        return cls(r.world_size, r.rank, pp_rank, layout, r.device.name, r.device.total_memory, r.routing.describe(),
                   micro_batches, r.memory.peak.total, r.memory.peak.phase, r.memory.setup_peak,
                   dict(r.memory.peak.by_category),
                   dict(r.memory.category_max),
                   {c: (getattr(stage, f) if f else None) for c, f in PLANNER_FIELDS.items()},
                   r.collectives.summary(), syncs, [s for s in syncs if s["unexpected"]],
                   dataclasses.asdict(checkpoint) if checkpoint is not None else {}, dict(r.phases), replayed,
                   r.memory.pinned_max, stage.offloaded, host_optimizer_state, stage.optimizer_host,
                   [dict(measured, kept_planned=kept, backward_planned=backward)
                    for measured, kept, backward in zip(chunk_passes, stage.chunk_kept, stage.chunk_backward)
                    if measured is not None])

    def check(self) -> "RehearsalReport":
        """Raises RehearsalFailed listing the unexpected host synchronisations; returns self otherwise."""
        if self.unexpected_syncs:
            lines = [f"  {s['count']} x {s['kind']} ({s['detail']}) at {s['site']}: {s['code']}"
                     for s in self.unexpected_syncs]
            raise RehearsalFailed(f"rank {self.rank}: host synchronisations outside the allowed list "
                                  f"(k2_megatron/rehearsal/host_sync.py ALLOWED_SYNCS):\n" + "\n".join(lines))
        return self

    def memory_rows(self) -> list[dict]:
        """Per category: bytes at the peak, the category's own maximum, the planner's estimate, the difference."""
        rows = []
        for c in CATEGORIES:
            planned = self.planned.get(c)
            measured = self.category_max[c]
            diff = (measured - planned) / planned if planned else None
            rows.append({"category": c, "at_peak": self.at_peak[c], "max": measured, "planned": planned,
                         "difference": diff})
        return rows

    def format_memory(self) -> str:
        gib = lambda b: f"{b / GIB:9.2f}"  # noqa: E731
        lines = [f"rank {self.rank} of {self.world_size} (pipeline stage {self.pipeline_rank}; {self.layout}) on "
                 f"{self.device}, {self.micro_batches} micro-batches, routing {self.routing}",
                 f"peak device memory {self.peak_total / GIB:.2f} GiB of {self.device_memory / GIB:.1f} GiB, "
                 f"during {self.peak_phase} (setup: {self.setup_peak / GIB:.2f} GiB)",
                 f"  {'category':<24}{'at peak':>9}{'max':>10}{'planner':>10}  difference (GiB)"]
        for row in self.memory_rows():
            planned = gib(row["planned"]) if row["planned"] is not None else "      n/m"
            diff = (f"  {row['difference']:+.0%}" + ("  <- >10%" if abs(row["difference"]) > 0.10 else "")
                    if row["difference"] is not None else "")
            lines.append(f"  {row['category']:<24}{gib(row['at_peak'])}{gib(row['max']):>10}{planned:>10}{diff}")
        lines.append(f"  {'pinned host (offload)':<24}{'':>9}{gib(self.pinned_host):>10}"
                     f"{gib(self.pinned_host_planned or 0):>10}  (host memory, not in the device peak)")
        lines.append("  (n/m: not modelled by the dry-run planner, k2_megatron/training/plan.py)")
        if self.host_optimizer_state or self.planned_host_optimizer_state:
            lines.append(f"  {'host: optimizer state':<24}{'':>9}{gib(self.host_optimizer_state):>10}"
                         f"{gib(self.planned_host_optimizer_state):>10}  (pinned, memory.optimizer_state_on_host)")
        for i, c in enumerate(self.chunk_passes):
            lines.append(f"  model chunk {i}, one micro-batch: keeps {c['kept'] / GIB:.3f} GiB (planner "
                         f"{c['kept_planned'] / GIB:.3f}), backward working set {c['backward_high'] / GIB:.3f} GiB "
                         f"(planner {c['backward_planned'] / GIB:.3f})")
        return "\n".join(lines)

    def format_collectives(self) -> str:
        lines = [f"collectives of the step (rank {self.rank}): count, op, group, dtype, device, MiB, issued at"]
        for c in sorted(self.collectives, key=lambda c: (c["phase"], -c["bytes"])):
            lines.append(f"  [{c['phase']}] {c['count']:>5} x {c['op']:<24} {c['group']:<40} {c['dtype']:<9} "
                         f"{c['device']:<5} {c['bytes'] / 2**20:>10.1f}  {c['site']}")
        return "\n".join(lines)

    def format_syncs(self) -> str:
        lines = [f"host synchronisations (rank {self.rank}): count, kind, what, where"]
        for s in self.syncs:
            tag = (f"allowed: {s['allowed']}" if s["allowed"] else "UNEXPECTED" if s["unexpected"]
                   else "not a step synchronisation" if s["kind"] != "host value of device data" else "after a copy")
            lines.append(f"  [{s['phase']}] {s['count']:>5} x {s['kind']} ({s['detail']}) at {s['site']} [{tag}]"
                         + (f"\n        {s['code']}" if s["code"] else ""))
        return "\n".join(lines)

    def format(self) -> str:
        parts = [self.format_memory(), self.format_collectives(), self.format_syncs()]
        if self.checkpoint:
            c = self.checkpoint
            parts.append(f"checkpoint (dry): {c['tensors']} shards, {c['bytes'] / GIB:.2f} GiB written by this rank "
                         f"({c['replicas_skipped']} replicas written by other ranks, {c['objects']} objects)")
        return "\n\n".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_memory_table(reports: list[RehearsalReport]) -> str:
    """Per-rank peak device memory by category (GiB): what the rehearsal measured next to the dry-run planner,
    with the categories where they differ by more than 10% marked."""
    gib = lambda b: f"{b / GIB:.2f}" if b is not None else "n/m"  # noqa: E731
    first = reports[0]
    width = 26
    head = f"{'GiB':<24}" + "".join(f"{f'rank {r.rank} (stage {r.pipeline_rank})':>{width}}" for r in reports)
    sub = f"{'':<24}" + "".join(f"{'measured   planner   diff':>{width}}" for _ in reports)
    lines = [f"per-rank device memory, one training step rehearsed: {first.layout}, world {first.world_size}, "
             f"{first.micro_batches} micro-batches per step, on {first.device} ({first.device_memory / GIB:.1f} GiB); "
             f"measured = each category's maximum during the step, planner = k2_megatron/training/plan.py "
             f"(n/m: not modelled)", head, sub]
    flagged = []
    for c in CATEGORIES:
        cells = []
        for r in reports:
            row = next(x for x in r.memory_rows() if x["category"] == c)
            diff = f"{row['difference']:+.0%}" if row["difference"] is not None else ""
            if row["difference"] is not None and abs(row["difference"]) > 0.10:
                diff += "*"
                flagged.append(f"{c} on rank {r.rank}: measured {gib(row['max'])} GiB, planner "
                               f"{gib(row['planned'])} GiB ({row['difference']:+.0%})")
            cells.append(f"{gib(row['max']):>10}{gib(row['planned']):>10}{diff:>6}")
        lines.append(f"{c:<24}" + "".join(f"{cell:>{width}}" for cell in cells))
    if any(r.host_optimizer_state or r.planned_host_optimizer_state for r in reports):
        lines.append(f"{'host: optimizer state':<24}" + "".join(
            f"{gib(r.host_optimizer_state):>10}{gib(r.planned_host_optimizer_state):>10}{'':>6}" for r in reports)
            + "  (pinned host memory, memory.optimizer_state_on_host)")
    lines.append(f"{'peak (all categories)':<24}" + "".join(
        f"{gib(r.peak_total) + ' (' + r.peak_phase.split()[0] + ')':>{width}}" for r in reports))
    if any(r.pinned_host or r.pinned_host_planned for r in reports):
        lines.append(f"{'pinned host (offload)':<24}" + "".join(
            f"{gib(r.pinned_host):>10}{gib(r.pinned_host_planned or 0):>10}{'':>6}" for r in reports)
            + "   (host memory of the rank's CPU-offloaded activations, not in the device peak)")
    over = [r for r in reports if r.peak_total > r.device_memory]
    if over:
        lines.append("over the device's memory: " + ", ".join(f"rank {r.rank} by {(r.peak_total - r.device_memory) / GIB:.1f} GiB"
                                                             for r in over))
    if flagged:
        lines.append("* planner off by more than 10%: " + "; ".join(flagged))
    return "\n".join(lines)
