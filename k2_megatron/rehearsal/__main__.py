"""``python -m k2_megatron.rehearsal --config X --world-size N --rank R``: rehearse one training step of rank R of a
world of N on this CPU and print its report (memory by category next to the dry-run planner, collectives, host
synchronisations). ``--ranks first,middle,last`` rehearses the first rank of the first, middle and last pipeline
stage, each in its own process, and prints the per-rank memory table. Exit status 1 when a step makes a host
synchronisation outside k2_megatron/rehearsal/host_sync.py's ALLOWED_SYNCS, 2 for a bad config."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k2_megatron.rehearsal", description=__doc__)
    p.add_argument("--config", default=None, help="pretraining YAML config (default: the tiny CPU recipe)")
    p.add_argument("--world-size", type=int, required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int, help="the global rank to rehearse")
    group.add_argument("--ranks", help="'first,middle,last' (pipeline stages) or a comma-separated list of ranks")
    p.add_argument("--routing", default="balanced", help="MoE routing: 'balanced' or 'skewed:<s>' (this rank's "
                   "experts get s times the balanced load)")
    p.add_argument("--no-replay", action="store_true", help="compute every micro-batch (slow) instead of replaying "
                   "identical ones from a recorded one")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="with --ranks: how many ranks to rehearse "
                   "at once, each in its own process on one core (default: the CPU count)")
    p.add_argument("--json", default=None, help="write the report(s) as JSON to this file")
    p.add_argument("--summary", action="store_true", help="print only the memory table")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return p


def pipeline_ranks(cfg, world_size: int, spec: str) -> list[int]:
    """Global ranks for 'first,middle,last' (the first rank of those pipeline stages; megatron's default rank order
    puts the pipeline outermost) or an explicit list."""
    stages = cfg.parallel.pipeline
    per_stage = world_size // stages
    named = {"first": 0, "middle": stages // 2, "last": stages - 1}
    ranks = []
    for item in spec.split(","):
        item = item.strip()
        ranks.append(named[item] * per_stage if item in named else int(item))
    return list(dict.fromkeys(ranks))


def _run_one(args, cfg) -> "RehearsalReport":  # noqa: F821
    from k2_megatron.rehearsal.routing import Routing
    from k2_megatron.rehearsal.step import rehearse_step

    return rehearse_step(cfg, world_size=args.world_size, rank=args.rank, routing=Routing.parse(args.routing),
                         replay=not args.no_replay)


def _run_many(args, ranks: list[int]) -> list[dict]:
    """Each rank rehearsed in its own process, ``args.jobs`` at a time (a rehearsal is one Python thread of fake
    tensors: one core each); the reports in the order of ``ranks``."""
    with tempfile.TemporaryDirectory(prefix="k2_rehearsal_") as tmp:
        outputs = [os.path.join(tmp, f"rank{rank}.json") for rank in ranks]
        running: list[tuple[int, str, subprocess.Popen]] = []
        try:
            for rank, out in zip(ranks, outputs):
                if len(running) >= args.jobs:
                    _check_rank(*running.pop(0))
                with open(out + ".log", "w", encoding="utf-8") as log:  # a file: a full pipe would stall the rank
                    running.append((rank, out, subprocess.Popen(_rank_command(args, rank, out), stdout=log,
                                                                stderr=subprocess.STDOUT)))
            while running:
                _check_rank(*running.pop(0))
        finally:  # a failed rank (or an interrupt) stops the others
            for _, _, proc in running:
                proc.kill()
                proc.wait()
        reports = []
        for out in outputs:
            with open(out, encoding="utf-8") as f:
                reports.append(json.loads(f.read())[0])
    return reports


def _rank_command(args, rank: int, out: str) -> list[str]:
    cmd = [sys.executable, "-m", "k2_megatron.rehearsal", "--world-size", str(args.world_size), "--rank", str(rank),
           "--routing", args.routing, "--json", out, "--summary"]
    cmd += (["--config", args.config] if args.config else []) + (["--no-replay"] if args.no_replay else [])
    return cmd + list(args.overrides)


def _check_rank(rank: int, out: str, proc: subprocess.Popen) -> None:
    """Waits for a rank's rehearsal; exits naming the rank (with its output) when it produced no report."""
    proc.wait()
    with open(out + ".log", encoding="utf-8", errors="replace") as f:
        output = f.read()
    if proc.returncode not in (0, 1):
        sys.stderr.write(output)
        raise SystemExit(f"rehearsal of rank {rank} failed (exit status {proc.returncode})")
    if not os.path.exists(out) or not os.path.getsize(out):  # status 1 is also Python's for an uncaught exception
        sys.stderr.write(output)
        raise SystemExit(f"rehearsal of rank {rank} failed (exit status {proc.returncode}, no report)")


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    from k2_megatron.rehearsal.report import RehearsalReport, format_memory_table
    from k2_megatron.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        cfg.validate()
        cfg.layout(args.world_size)
    except ConfigError as e:
        print(f"rehearsal: config error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"rehearsal: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.ranks is not None:
        reports = [RehearsalReport(**r) for r in _run_many(args, pipeline_ranks(cfg, args.world_size, args.ranks))]
    else:
        report = _run_one(args, cfg)
        reports = [report]
        if not args.summary:
            print(report.format())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in reports], f, default=str)
    if args.ranks is not None or args.summary:
        print(format_memory_table(reports))
    failed = [r for r in reports if r.unexpected_syncs]
    for r in failed:
        print(f"rank {r.rank}: {sum(s['count'] for s in r.unexpected_syncs)} host synchronisations in the step outside "
              f"the allowed list:\n" + "\n".join(f"  {s['count']} x {s['kind']} at {s['site']}: {s['code']}"
                                                 for s in r.unexpected_syncs), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
