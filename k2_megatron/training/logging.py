"""What a pretraining run shows: a progress bar, per-step log lines, JSON-lines metrics, TensorBoard events and,
at the end, a PNG of loss and max attention logits over steps (the K2 report's figure). Rank 0 only.

``metrics.jsonl`` is the run's record, append-only: one row per step (per-layer figures at logged steps only) and
one per validation. A resumed run cuts it back to the checkpoint's step (rows of steps trained after it, by a run
that stopped without saving them, would otherwise appear twice) and rebuilds its history (the plot's and the
summary's figures) from it; checkpoints carry no history."""

from __future__ import annotations

import json
import math
import os
import sys


class RunLogger:
    """Collects per-step metrics on rank 0 and writes them to the console, ``metrics.jsonl`` and TensorBoard."""

    def __init__(self, out_dir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_bar: bool = True, tensorboard: bool = True):
        """start_step: the step the run starts after (a resumed checkpoint's; 0: from the start); metrics.jsonl is
        cut back to it and the history read from it."""
        self.enabled = enabled
        self.out_dir = out_dir
        self.history = {"train": [], "valid": []}
        self.bar = None
        self.writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.history = history_until(metrics_path, start_step)
        self.metrics_file = open(metrics_path, "a", encoding="utf-8")
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def log_step(self, m: dict, print_line: bool) -> None:
        """m: step, loss, lr, grad_norm, tokens_per_s, max_logits {layer: v}, clipped_heads {layer: n},
        expert_load {layer: max/mean}, mfu (GPU), skipped."""
        if not self.enabled:
            return
        self.history["train"].append(_history_row(m))
        self.metrics_file.write(json.dumps({"kind": "train", **m}) + "\n")
        self.metrics_file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        if self.writer is not None:
            w, s = self.writer, m["step"]
            w.add_scalar("train/loss", m["loss"], s)
            w.add_scalar("train/lr", m["lr"], s)
            w.add_scalar("train/tokens_per_s", m["tokens_per_s"], s)
            if m.get("grad_norm") is not None:
                w.add_scalar("train/grad_norm", m["grad_norm"], s)
            if m.get("mfu") is not None:
                w.add_scalar("train/mfu", m["mfu"], s)
            if m.get("max_logit") is not None:
                w.add_scalar("qk/max_logit", m["max_logit"], s)
            for layer, v in m.get("max_logits", {}).items():
                w.add_scalar(f"qk/max_logit/{layer}", v, s)
            for layer, v in m.get("clipped_heads", {}).items():
                w.add_scalar(f"qk/clipped_heads/{layer}", v, s)
            for layer, v in m.get("expert_load", {}).items():
                w.add_scalar(f"moe/max_over_mean_load/{layer}", v, s)
        if print_line:
            gn = "n/a" if m.get("grad_norm") is None else f"{m['grad_norm']:.3f}"
            logits = " ".join(f"{_short(k)}={v:.1f}" for k, v in m.get("max_logits", {}).items())
            clipped = sum(m.get("clipped_heads", {}).values())
            load = " ".join(f"{_short(k)}={v:.2f}" for k, v in m.get("expert_load", {}).items())
            mfu = f" mfu {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
            self.print(f"step {m['step']:>6} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad norm {gn} | "
                       f"{m['tokens_per_s']:.0f} tok/s{mfu} | max logit [{logits}] | clipped heads {clipped} | "
                       f"expert load max/mean [{load}]")

    def log_validation(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self.history["valid"].append({"step": step, "loss": loss})
        self.metrics_file.write(json.dumps({"kind": "valid", "step": step, "loss": loss}) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, step)
        self.print(f"step {step:>6} | validation loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.1f})")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics_file.close()


def _history_row(m: dict) -> dict:
    return {k: m.get(k) for k in ("step", "loss", "lr", "grad_norm", "max_logit")}


def history_until(metrics_path: str, step: int) -> dict:
    """The history ({"train": [...], "valid": [...]}) of the rows of ``metrics_path`` up to ``step``; the file is cut
    (truncated in place) before its first row past ``step`` or its first unreadable row (a crash mid-write). No file:
    an empty history."""
    history = {"train": [], "valid": []}
    if not os.path.exists(metrics_path):
        return history
    keep = 0
    with open(metrics_path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
                kind, row_step = row["kind"], row["step"]
            except (ValueError, KeyError, TypeError):
                break
            if row_step > step or kind not in history:
                break
            history[kind].append(_history_row(row) if kind == "train" else {"step": row_step, "loss": row["loss"]})
            keep += len(line)
    if keep < os.path.getsize(metrics_path):
        os.truncate(metrics_path, keep)
    return history


def _short(layer: str) -> str:
    # "layers.3.self_attention" -> "L3"
    parts = layer.split(".")
    return f"L{parts[1]}" if len(parts) > 1 and parts[0] == "layers" else layer


def plot_history(history: dict, path: str, *, tau: float | None = None, title: str = "K2 pretraining") -> str:
    """PNG with two panels: train (and validation) loss over steps; max attention logit over steps (with tau)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = history.get("train", [])
    valid = history.get("valid", [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if valid:
        ax1.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation")
    if history.get("unigram_baseline") is not None:
        ax1.axhline(history["unigram_baseline"], color="gray", ls="--", lw=1, label="unigram baseline")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/token)")
    ax1.legend()
    ax1.set_title("loss")
    pts = [(r["step"], r["max_logit"]) for r in train if r.get("max_logit") is not None]
    if pts:
        ax2.plot(*zip(*pts), lw=1, label="max logit (all layers)")
    if tau is not None:
        ax2.axhline(tau, color="red", ls="--", lw=1, label=f"tau = {tau:g}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("max attention logit")
    ax2.legend()
    ax2.set_title("max logits")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
