"""K2 pretraining on megatron-core: the entry point behind ``k2-pretrain`` and ``examples/pretrain_k2.py``.

    python examples/pretrain_k2.py                                  # k2-tiny on the bundled corpus, this CPU
    python examples/pretrain_k2.py --config examples/configs/k2_mini_1gpu.yaml train.iters=2000
    torchrun --nproc-per-node 2 examples/pretrain_k2.py train.iters=20     # several processes (gloo on CPU)
    python examples/pretrain_k2.py --config examples/configs/k2_full.yaml --dry-run   # per-rank memory plan
    python examples/pretrain_k2.py --config examples/configs/k2_full.yaml --rehearse --world-size 256 --rank 0

The loop itself is k2_megatron.training.trainer.Trainer (setup, step, evaluate, save, run): this module is its
command line. ``--rehearse`` runs one step of a rank of a GPU cluster on this CPU (k2_megatron.rehearsal).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser is torch.compile: a cold compile costs

from k2_megatron.config import ConfigError, PretrainConfig, load_config  # noqa: E402
from k2_megatron.training.trainer import Trainer  # noqa: E402

# exit statuses of k2-pretrain besides 0 (finished)
EXIT_FAILED = 1      # failed while running (a save that could not be written: one line; else a traceback)
EXIT_BAD_INPUT = 2   # cannot run as configured: the config, or an input or directory it names (a tokenizer, dataset
#                      prefixes, a checkpoint to load, a dataset index, an output directory another run holds)
EXIT_STOPPED = 3     # stopped early (SIGTERM, SIGINT, train.max_wall_seconds) after a checkpoint: resume it
EXIT_NONFINITE = 4   # non-finite gradients (optim.nonfinite): stopped after a checkpoint of the state before them


def pretrain(cfg: PretrainConfig, *, step_callback=None, _before_publish=None) -> dict:
    """Runs the pretraining described by ``cfg`` on this process (one rank of a torchrun job, or alone): the
    Trainer's setup and run (k2_megatron.training.trainer), then the process groups torn down. Returns (on every
    rank; figures are global): {"losses": [per-step train loss], "valid": [(step, loss)], "final_step",
    "stopped_by" (None, "SIGTERM", "SIGINT", "max_wall_seconds"), "unigram_baseline", "checkpoint", "plot",
    "seconds", "history"}. ``step_callback(step, metrics)`` is called after each step (tests)."""
    trainer = Trainer(cfg, step_callback=step_callback, _before_publish=_before_publish)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()


# ----- command line -----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2-pretrain", description="Pretrain a K2 model on megatron-core with MuonClip. With no arguments: "
        "k2-tiny on the bundled Shakespeare corpus, on this machine, in a few minutes.",
        epilog="overrides: section.key=value, e.g. train.iters=20 optim.peak_lr=3e-3 parallel.pipeline=2 "
               "optim.qk_clip_tau=null model.overrides.num_hidden_layers=2. "
               f"Exit status: 0 finished; {EXIT_BAD_INPUT} a config, checkpoint or data set that cannot be used "
               f"(one line naming it); {EXIT_STOPPED} stopped early by SIGTERM, SIGINT or train.max_wall_seconds "
               f"after saving a checkpoint (it prints the command that resumes the run); {EXIT_NONFINITE} stopped "
               "by non-finite gradients after saving the state before them (optim.nonfinite); 1 failed while running "
               "(a checkpoint that could not be written: one line; anything else: its traceback).")
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny CPU recipe, "
                        "examples/configs/k2_tiny_cpu.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the per-rank parameter and memory plan of "
                        "the config on a simulated world, build nothing real, then exit")
    parser.add_argument("--world-size", type=int, default=None, help="simulated world size for --dry-run "
                        "(default: WORLD_SIZE, else TP x PP x EP) and --rehearse (required there)")
    parser.add_argument("--rehearse", action="store_true", help="rehearse one training step of rank --rank of a "
                        "GPU job of --world-size ranks on this CPU (fake CUDA tensors, NCCL's rules; "
                        "k2_megatron.rehearsal): print its memory by category next to the dry-run plan, its "
                        "collectives and host synchronisations, then exit (status 1: a host synchronisation "
                        "outside the allowed list)")
    parser.add_argument("--rank", default="0", help="for --rehearse: a global rank, a comma-separated list, or "
                        "first,middle,last (the first rank of those pipeline stages; one process each, then the "
                        "per-rank memory table)")
    parser.add_argument("--routing", default="balanced", help="for --rehearse: the declared MoE routing, "
                        "'balanced' or 'skewed:<s>' (this rank's experts get s times the balanced load)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def _quiet_libraries() -> None:
    """megatron-core and torch.distributed.checkpoint warn about optional packages (Transformer Engine, Apex) and
    deprecations on every rank; the command line keeps the console for the run's own output."""
    import logging
    import warnings

    for module in ("megatron", "torch.distributed", "torch.utils.cpp_extension"):
        warnings.filterwarnings("ignore", module=module.replace(".", r"\."))
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # megatron reads .grad of non-leaf fp32 master views under cpu_compat's device mode (harmless)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    for name in ("megatron", "torch.distributed.checkpoint", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``k2-pretrain``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _report(e, EXIT_BAD_INPUT)
    if args.dry_run:
        from k2_megatron.training.plan import dry_run

        return dry_run(cfg, world_size=args.world_size)
    if args.rehearse:
        return _rehearse(args)
    from k2_megatron.checkpoint.errors import CheckpointError, CheckpointSaveError
    from k2_megatron.data.dataset_index import DatasetIndexError
    from k2_megatron.optim import NonFiniteGradientError
    from k2_megatron.training.run_lock import RunLockError

    try:
        result = pretrain(cfg)
    except CheckpointSaveError as e:
        return _report(e, EXIT_FAILED)
    except (ConfigError, CheckpointError, DatasetIndexError, RunLockError) as e:
        return _report(e, EXIT_BAD_INPUT)
    except NonFiniteGradientError as e:
        print(f"k2-pretrain: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    if result["stopped_by"] is None:
        return 0
    if os.environ.get("RANK", "0") == "0":
        print(f"k2-pretrain: stopped by {result['stopped_by']} after step {result['final_step']} of "
              f"{cfg.train.iters}; checkpoint {result['checkpoint']}; resume with: {resume_command(cfg, argv)}")
    return EXIT_STOPPED


def resume_command(cfg: PretrainConfig, argv: list[str]) -> str:
    """The command that resumes a stopped run: its own (a run continues from the latest checkpoint in its
    checkpoint directory), with checkpoint.resume=true when it was off. Under torchrun or srun, their options
    come first as before."""
    program = sys.argv[0]
    if os.path.basename(program) == "k2-pretrain":
        words = ["k2-pretrain"]
    elif program.endswith(os.path.join("k2_megatron", "training", "pretrain.py")):
        words = ["python", "-m", "k2_megatron.training.pretrain"]
    else:
        words = ["python", program]
    words += argv + ([] if cfg.checkpoint.resume else ["checkpoint.resume=true"])
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "SLURM_JOB_ID" in os.environ
    return shlex.join(words) + (" (launched as before: the same torchrun / srun options)" if launched else "")


def _report(error: Exception, status: int) -> int:
    """``error`` as one line on stderr (every rank that meets it prints it); returns ``status``."""
    kind = "config error" if isinstance(error, ConfigError) else type(error).__name__
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    print(f"k2-pretrain: {kind}: {text}", file=sys.stderr, flush=True)
    return status


def _rehearse(args) -> int:
    """``--rehearse``: the rehearsal's own command line (python -m k2_megatron.rehearsal, a program of its own that
    runs this module's Trainer under fake CUDA) with these arguments; its exit status."""
    import subprocess

    if args.world_size is None:
        print("k2-pretrain: --rehearse needs --world-size N (the GPU job's number of ranks)", file=sys.stderr)
        return 2
    single = args.rank.strip().isdigit()
    argv = ["--world-size", str(args.world_size), "--rank" if single else "--ranks", args.rank.strip(),
            "--routing", args.routing] + (["--config", args.config] if args.config else [])
    return subprocess.call([sys.executable, "-m", "k2_megatron.rehearsal", *argv, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
