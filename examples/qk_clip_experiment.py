"""QK-Clip at small scale (K2 report, section 2): the same k2-tiny model trained twice on the bundled corpus with a
learning rate high enough for attention logits to run away, once with plain Muon (no clipping) and once with
MuonClip (QK-Clip at tau). Prints the max logits and writes one plot.

    python examples/qk_clip_experiment.py                          # ~4-6 minutes on a 2-core CPU
    python examples/qk_clip_experiment.py --steps 60 --tau 50 --lr 5e-2 --out runs/qk_clip

Expected: without clipping the largest max logit grows far past tau; with MuonClip it stays at or below tau
(each step's clip rescales the heads whose logits exceeded tau back onto tau, so the logged value, measured in
the forward before the clip, can exceed tau by the growth of a single step).
"""

import argparse
import os
import sys

from k2_megatron.config import load_config
from k2_megatron.training.pretrain import _quiet_libraries, pretrain


def run(tau, args, name):
    overrides = [f"train.iters={args.steps}", f"optim.peak_lr={args.lr}", f"optim.min_lr={args.lr}",
                 "optim.warmup_steps=5", f"optim.qk_clip_tau={'null' if tau is None else tau}",
                 "train.eval_interval=0", "train.log_interval=1",  # every step's max logit (logged steps only)
                 f"output.dir={os.path.join(args.out, name)}", "output.plot=false", "checkpoint.save_at_end=false",
                 "checkpoint.resume=false", "output.progress_bar=false", *args.overrides]
    result = pretrain(load_config(None, overrides))
    return [r["max_logit"] for r in result["history"]["train"]], result["losses"]


def main(argv=None):
    """Runs both trainings, writes the plot; returns {"muon": max logits, "muonclip": max logits, "plot": path}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=5e-2, help="constant after 5 warm-up steps")
    parser.add_argument("--tau", type=float, default=30.0)
    parser.add_argument("--out", default="runs/qk_clip")
    parser.add_argument("overrides", nargs="*", help="more section.key=value overrides for both runs")
    args = parser.parse_args(argv)
    _quiet_libraries()
    muon_logits, muon_loss = run(None, args, "muon")
    clip_logits, clip_loss = run(args.tau, args, "muonclip")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(muon_logits) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, muon_logits, label="Muon (no clipping)")
    ax1.plot(steps, clip_logits, label=f"MuonClip (tau = {args.tau:g})")
    ax1.axhline(args.tau, color="red", ls="--", lw=1, label="tau")
    ax1.set_xlabel("step")
    ax1.set_ylabel("max attention logit (all layers and heads)")
    ax1.legend()
    ax2.plot(steps, muon_loss, label="Muon (no clipping)")
    ax2.plot(steps, clip_loss, label="MuonClip")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend()
    fig.suptitle(f"QK-Clip on k2-tiny, lr {args.lr:g}")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.abspath(os.path.join(args.out, "qk_clip.png"))
    fig.savefig(path, dpi=110)
    print(f"max logit, Muon without clipping: final {muon_logits[-1]:.1f}, peak {max(muon_logits):.1f}")
    print(f"max logit, MuonClip (tau {args.tau:g}): final {clip_logits[-1]:.1f}, peak {max(clip_logits):.1f} "
          "(measured in each forward, before that step's clip: tau plus at most one step of growth)")
    print(f"final training loss: Muon {muon_loss[-1]:.4f}, MuonClip {clip_loss[-1]:.4f}")
    print(f"plot: {path}")
    return {"muon": muon_logits, "muonclip": clip_logits, "tau": args.tau, "plot": path}


if __name__ == "__main__":
    main()
    sys.exit(0)
