"""``MuonClip``: Muon for hidden matrices, AdamW for the rest, QK-Clip after every step (K2 report section 2).

    groups = muon_param_groups(model, lr=2e-4, weight_decay=0.1)
    opt = MuonClip(groups)
    for layer in attention_layers:
        opt.register_attention(f"layers.{i}", w_q_up=..., w_kv_up=..., layout=MLAHeadLayout(...),
                               max_logits=layer.core_attention.take_max_attn_logits)
    loss.backward(); opt.step(); opt.zero_grad()

Each param group says ``use_muon``. Muon params are 2-D matrices or 3-D expert stacks [E, n, m] (E matrices);
a parameter marked with ``set_row_matrices`` (megatron's fused SwiGLU [gate; up]) holds several matrices along its
rows, each orthogonalised on its own. All Muon updates of the same matrix shape, dtype, device and Newton-Schulz
settings are orthogonalised in one batched ``newton_schulz`` call. This class is the single-process optimizer; the
megatron integration (ZeRO-1 shards, TP/EP/PP) builds it with its own ``orthogonalize`` and reuses the pure
functions of ``k2_megatron.optim.muon`` and ``qk_clip``. QK-Clip takes each layer's per-head max logits one way: the
``max_logits`` callable given at registration, asked once per step.
"""

import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from k2_megatron.config.memory import DEFAULT_MUON_BUFFER_MIB, finite_check_piece
from k2_megatron.ops import DEFAULT_COEFFICIENTS
from k2_megatron.ops.newton_schulz import flatten_coefficients
from k2_megatron.optim.muon import (MUON_UPDATE_SCALE, adamw_step_, apply_decoupled_update_, matrices_of_update,
                                    muon_momentum_, muon_orthogonalize)
from k2_megatron.optim.qk_clip import (QK_CLIP_ALPHA, QK_CLIP_TAU, MLAHeadLayout, WeightShard, check_max_logits,
                                       check_mla_weights, check_qk_clip_args, qk_clip_)

# Names of parameters that stay on AdamW although they are matrices: embeddings and the output head (Muon is
# for hidden layers), and the MoE router, whose rows are per-expert score directions rather than a linear map
# of the residual stream (K2 lists the attention and FFN projections as Muon's matrices).
DEFAULT_ADAMW_PATTERNS = (r"embed", r"lm_head", r"output_layer", r"router", r"(^|\.)mlp\.gate\.")

_MUON_KEYS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_eps", "ns_dtype", "update_scale")


class NonFiniteGradientError(RuntimeError):
    """Raised by ``MuonClip.step`` when a gradient holds inf or NaN (with nonfinite="raise")."""


def uses_muon(name: str, param: torch.Tensor, adamw_patterns: Iterable[str] = DEFAULT_ADAMW_PATTERNS) -> bool:
    """The default split: Muon for 2-D matrices and 3-D expert stacks whose name matches no AdamW pattern."""
    return param.dim() in (2, 3) and not any(re.search(p, name) for p in adamw_patterns)


def muon_param_groups(model_or_named_params, *, adamw_patterns: Iterable[str] = DEFAULT_ADAMW_PATTERNS,
                      **group_options) -> list[dict]:
    """Splits parameters into a Muon group (2-D/3-D hidden matrices) and an AdamW group (the rest).

    Accepts a module or an iterable of (name, param). A parameter goes to AdamW when it has fewer than 2
    dimensions or its name matches one of ``adamw_patterns`` (regular expressions). ``group_options``
    (lr, weight_decay, ...) are copied into both groups. Frozen parameters are left out.
    """
    named = model_or_named_params.named_parameters() if isinstance(model_or_named_params, torch.nn.Module) \
        else model_or_named_params
    muon, adamw = ([], []), ([], [])
    for name, p in named:
        if not p.requires_grad:
            continue
        bucket = muon if uses_muon(name, p, adamw_patterns) else adamw
        bucket[0].append(p)
        bucket[1].append(name)
    groups = []
    for (params, names), use_muon in ((muon, True), (adamw, False)):
        if params:
            groups.append({"params": params, "param_names": names, "use_muon": use_muon, **group_options})
    return groups


def all_finite(tensors: Iterable[torch.Tensor], budget_bytes: int = DEFAULT_MUON_BUFFER_MIB * 2**20) -> torch.Tensor:
    """0-d bool tensor on the tensors' device (nothing read back to the host): every element of ``tensors`` is
    finite. Each tensor is checked in pieces whose ``torch.isfinite`` temporaries fit ``budget_bytes``
    (k2_megatron.config.memory.finite_check_piece): a whole 4-billion-element gradient buffer at once would hold
    28 GB."""
    flags = []
    for t in tensors:
        for piece in t.reshape(-1).split(finite_check_piece(t.element_size(), budget_bytes)):
            flags.append(torch.isfinite(piece).all())
    return torch.stack(flags).all() if flags else torch.tensor(True)


def batched_orthogonalize(items: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Muon's O for each (group, param, update): every matrix of the parameter on its own (a 3-D [E, n, m] stack is
    E matrices, a parameter marked with ``set_row_matrices`` holds several along its rows), one batched
    Newton-Schulz call per matrix shape, dtype, device and Newton-Schulz setting."""
    matrices = [matrices_of_update(u, p) for _, p, u in items]
    buckets: dict[tuple, list[int]] = {}
    for i, ((group, _, u), mats) in enumerate(zip(items, matrices)):
        key = (tuple(mats.shape[-2:]), u.dtype, u.device, group["ns_steps"], str(group["ns_coefficients"]),
               group["ns_eps"], group["ns_dtype"], group["update_scale"])
        buckets.setdefault(key, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for indices in buckets.values():
        group = items[indices[0]][0]
        stacked = torch.cat([matrices[i] for i in indices])
        ortho = muon_orthogonalize(stacked, ns_steps=group["ns_steps"], ns_coefficients=group["ns_coefficients"],
                                   ns_eps=group["ns_eps"], ns_dtype=group["ns_dtype"], scale=group["update_scale"])
        offset = 0
        for i in indices:
            count = matrices[i].shape[0]
            out[i] = ortho[offset:offset + count].view_as(items[i][2])
            offset += count
    return out


@dataclass
class QKClipTarget:
    """One attention layer registered for QK-Clip: its up-projections (whole weights or WeightShards) and the
    callable that hands over its per-head max logits for a step."""

    w_q_up: torch.Tensor | WeightShard | None  # None: no piece of it is updated by this optimizer
    w_kv_up: torch.Tensor | WeightShard | None
    layout: MLAHeadLayout
    max_logits: Callable[[], torch.Tensor | None]


@dataclass
class QKClipStats:
    """What QK-Clip saw and did on one attention layer in the last step (tensors: read them when you log)."""

    max_logits: torch.Tensor  # float [h]: each head's max logit over the step's global batch
    clipped: torch.Tensor  # bool [h]: the heads QK-Clip rescaled

    @property
    def max_logit(self) -> torch.Tensor:
        """0-d: the layer's largest head max logit."""
        return self.max_logits.max()

    @property
    def num_clipped(self) -> int:
        return int(self.clipped.sum())


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW with QK-Clip.

    Args:
        params: param groups, each with ``use_muon`` (see ``muon_param_groups``).
        lr: learning rate of both Muon and AdamW (Muon's update-RMS matching makes one rate fit both).
        momentum, nesterov: Muon momentum (M = mu M + G) and the Nesterov variant.
        weight_decay: decoupled weight decay (both).
        ns_steps, ns_coefficients, ns_eps, ns_dtype: Newton-Schulz settings (bf16, as in the paper).
        update_scale: Muon update scale factor, O * update_scale * sqrt(max(n, m)).
        adamw_betas, adamw_eps: AdamW settings.
        qk_clip_tau, qk_clip_alpha: QK-Clip threshold and split; tau=None turns QK-Clip off.
        nonfinite: "raise" (default) raises NonFiniteGradientError on an inf/NaN gradient before anything is
            updated; "skip" skips the whole step with a warning and counts it in ``skipped_steps``.
        orthogonalize: maps [(group, param, update)] of every Muon parameter to the orthogonalised updates; default
            ``batched_orthogonalize`` (same-shaped matrices batched on this process). The megatron integration
            passes its own, for ZeRO-1 shards and TP-split matrices.
        check_finite: check the gradients for inf / NaN (``nonfinite``); the megatron integration checks them
            across all ranks before the step instead.
    """

    def __init__(self, params, lr: float = 2e-4, *, momentum: float = 0.95, nesterov: bool = False,
                 weight_decay: float = 0.1, ns_steps: int = 5, ns_coefficients=DEFAULT_COEFFICIENTS,
                 ns_eps: float = 1e-7, ns_dtype: torch.dtype = torch.bfloat16,
                 update_scale: float = MUON_UPDATE_SCALE, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, qk_clip_tau: float | None = QK_CLIP_TAU,
                 qk_clip_alpha: float = QK_CLIP_ALPHA, nonfinite: str = "raise",
                 orthogonalize: Callable[[list], list] = batched_orthogonalize, check_finite: bool = True):
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"MuonClip: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"MuonClip: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"MuonClip: weight_decay must be >= 0, got {weight_decay}")
        if ns_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"MuonClip: ns_dtype must be torch.bfloat16 or torch.float32, got {ns_dtype}")
        flatten_coefficients(ns_steps, ns_coefficients)  # validates steps and coefficients
        if not all(0.0 <= b < 1.0 for b in adamw_betas) or len(adamw_betas) != 2:
            raise ValueError(f"MuonClip: adamw_betas must be two values in [0, 1), got {adamw_betas}")
        if qk_clip_tau is not None:
            check_qk_clip_args(qk_clip_tau, qk_clip_alpha)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"MuonClip: nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                        ns_coefficients=ns_coefficients, ns_eps=ns_eps, ns_dtype=ns_dtype,
                        update_scale=update_scale, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps)
        super().__init__(params, defaults)
        self.qk_clip_tau = qk_clip_tau
        self.qk_clip_alpha = qk_clip_alpha
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.qk_clip_targets: dict[str, QKClipTarget] = {}
        self.qk_clip_stats: dict[str, QKClipStats] = {}
        self.orthogonalize = orthogonalize
        self.check_finite = check_finite

    def add_param_group(self, param_group: dict) -> None:
        if "use_muon" not in param_group:
            raise ValueError("MuonClip: every param group needs 'use_muon' (True: Muon, False: AdamW); "
                             "k2_megatron.optim.muon_param_groups(model) builds them")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                self._check_muon_param(p, name)

    def _check_muon_param(self, p: torch.Tensor, name: str | None) -> None:
        if p.dim() not in (2, 3):
            raise ValueError(f"MuonClip: Muon takes 2-D matrices or 3-D expert stacks [E, n, m]; parameter "
                             f"{name or ''} has shape {tuple(p.shape)} (put it in an AdamW group)")

    # ---- QK-Clip registration --------------------------------------------------------------------------

    def register_attention(self, name: str, *, w_q_up: torch.Tensor | WeightShard | None,
                           w_kv_up: torch.Tensor | WeightShard | None, layout: MLAHeadLayout,
                           max_logits: Callable[[], torch.Tensor | None]) -> None:
        """Registers an MLA layer for QK-Clip. ``max_logits`` is called once per step for the layer's per-head
        max logits over the step's (global) batch, None when it has none (e.g. a K2 core attention's
        ``take_max_attn_logits``). The weights are the tensors this optimizer updates: whole 2-D weights, or
        ``WeightShard``s of them."""
        if self.qk_clip_tau is None:
            raise ValueError("MuonClip: register_attention needs QK-Clip on (qk_clip_tau is None)")
        if name in self.qk_clip_targets:
            raise ValueError(f"MuonClip: attention layer {name!r} is already registered")
        if not callable(max_logits):
            raise TypeError(f"MuonClip: max_logits of {name!r} must be a callable returning the step's per-head max "
                            f"logits, got {type(max_logits).__name__}")
        check_mla_weights(w_q_up, w_kv_up, layout)
        self.qk_clip_targets[name] = QKClipTarget(w_q_up, w_kv_up, layout, max_logits)

    # ---- step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can refuse the step is checked before any tensor is modified.
        max_logits = self._collect_max_logits()
        if self.check_finite and not self._grads_finite():
            return loss
        self._begin_step()
        self._muon_step()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_group_step(group)
        self._apply_qk_clip(max_logits)
        return loss

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if bool(all_finite(grads)):  # one host read per step
            return True
        bad = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [f"param {i}" for i in range(len(group["params"]))]
            bad += [f"group {gi} {n} {tuple(p.shape)}" for p, n in zip(group["params"], names)
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        msg = f"MuonClip: non-finite gradients in {', '.join(bad)}"
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(msg + "; nothing was updated")
        self.skipped_steps += 1
        warnings.warn(msg + f"; step skipped ({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=3)
        return False

    def init_state(self) -> None:
        """Allocates every parameter's state now (zeros) instead of at its first step; megatron's checkpoint
        loading needs the state's tensors to exist before it copies into them."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p, group["use_muon"])

    MOMENTUM_KEY = "momentum_buffer"  # Muon's momentum in the state of each parameter

    def _begin_step(self) -> None:
        """Called once per step, after the checks and before any update."""

    def _advance_step(self, group: dict, state: dict) -> int:
        """Counts one more step of a parameter; returns its step count (AdamW's bias correction)."""
        state["step"] = state["step"] + 1  # a new tensor: a loader may have shared one tensor between params
        return int(state["step"])

    def _state_of(self, p: torch.Tensor, use_muon: bool) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            if use_muon:
                state[self.MOMENTUM_KEY] = torch.zeros_like(p)
            else:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    def _muon_step(self) -> None:
        # Momentum per parameter, then one orthogonalisation pass over all Muon parameters (batched by shape).
        items = []
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p, True)
                self._advance_step(group, state)
                update = muon_momentum_(state[self.MOMENTUM_KEY], p.grad, group["momentum"], group["nesterov"])
                items.append((group, p, update))
        for (group, p, _), ortho in zip(items, self.orthogonalize(items)):
            apply_decoupled_update_(p, ortho.view_as(p), group["lr"], group["weight_decay"])

    def _adamw_group_step(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._state_of(p, False)
            step = self._advance_step(group, state)
            adamw_step_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step, lr=group["lr"],
                        betas=group["adamw_betas"], eps=group["adamw_eps"], weight_decay=group["weight_decay"])

    def _collect_max_logits(self) -> dict[str, torch.Tensor]:
        """The validated per-head max logits of every registered layer for this step."""
        collected = {}
        for name, target in self.qk_clip_targets.items():
            logits = target.max_logits()
            if logits is None:
                raise RuntimeError(f"MuonClip: no max logits for attention layer {name!r} this step (no forward "
                                   "since the last step?)")
            check_max_logits(logits, target.layout.num_heads, where=f"QK-Clip of {name!r}", finite=False)
            collected[name] = logits.detach()
        if collected and not bool(all_finite(collected.values())):  # every layer in one host read
            bad = [name for name, logits in collected.items() if not bool(torch.isfinite(logits).all())]
            raise ValueError(f"QK-Clip: non-finite max logits in {bad}; refusing to clip (the attention forward "
                             "overflowed or produced NaN)")
        return collected

    def _apply_qk_clip(self, max_logits: dict[str, torch.Tensor]) -> None:
        self.qk_clip_stats = {}
        for name, logits in max_logits.items():
            target = self.qk_clip_targets[name]
            clipped = qk_clip_(target.w_q_up, target.w_kv_up, logits, target.layout, tau=self.qk_clip_tau,
                               alpha=self.qk_clip_alpha, checked_finite=True)  # by _collect_max_logits
            self.qk_clip_stats[name] = QKClipStats(max_logits=logits, clipped=clipped)
