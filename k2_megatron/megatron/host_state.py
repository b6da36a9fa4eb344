"""MuonClip's optimizer state in host memory (the config's ``memory.optimizer_state_on_host``), streamed through
the device in pieces during the step.

At expert data-parallel size 1 (K2's 256-GPU layout) a rank holds the whole optimizer state of its experts: the
fp32 master weights and Muon's momentum (AdamW's two moments) are 8 bytes per parameter, ~32 GiB for k2_full's ~4.2B
expert parameters per rank. K2 offloads optimizer states to the CPU when the training nodes are few (report
section 2.4). Here the master shards and the states live in (pinned) host memory; the step brings each piece to the
device, computes there, and writes it back:

1. momentum: per piece of each Muon parameter's momentum, host -> device, M = mu M + G with the device gradient,
   the matrix to orthogonalise written over the gradient it consumed, M back to the host;
2. Newton-Schulz: unchanged (the ZeRO-1 gather -> orthogonalise -> scatter reads those gradients and writes Muon's
   O over them, within memory.muon_buffer_mib);
3. update: per piece, master (and AdamW's moments) host -> device, the decoupled update (AdamW's step) on the
   device, the bf16 model weight written from it on the device, master and moments back to the host. The attention
   up-projections QK-Clip may rescale are updated whole per layer, clipped there (as in the device-resident step,
   after their update), then written back.

Every arithmetic operation is the device-resident step's, on the same device in the same dtype, so the results are
identical; only copies are added. Per parameter and step that is 8 bytes each way for Muon (momentum and master),
12 for AdamW; the alternative (elementwise maths on the host, only Newton-Schulz on the device) moves as many bytes
(gradient down, momentum up, O down, weight up) and computes on the host's CPU, with other rounding. For k2_full
(~4.8B parameters per rank) it is ~38 GB each way per step, ~1.5 s at ~25 GB/s of PCIe per GPU, against a step of
minutes. Pieces hold k2_megatron.config.memory.streamed_piece_elements(memory.muon_buffer_mib) elements. Copies are
non_blocking (pinned memory), ordered on the current stream; host readers (checkpoints) first
wait for them (``wait_for_host_state``).

On a CPU run host and device are the same memory: the switch keeps separate state tensors and copies them all the
same (that is how the streamed step is tested against the device-resident one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from k2_megatron.optim.muon import adamw_step_, apply_decoupled_update_, muon_momentum_
from k2_megatron.optim.muonclip import QKClipStats
from k2_megatron.optim.qk_clip import WeightShard, qk_clip_


def host_tensor(like: torch.Tensor, device: torch.device, *, copy: bool) -> torch.Tensor:
    """A host tensor shaped as ``like``: zeros, or a copy of it (``copy``); pinned when ``device`` is a CUDA device
    (asynchronous copies both ways)."""
    host = torch.empty(like.shape, dtype=like.dtype, device="cpu")
    if copy:
        host.copy_(like)
    else:
        host.zero_()
    if device.type == "cuda":
        host = host.pin_memory()
    return host


def wait_for_host_state(device: torch.device) -> None:
    """Waits for the step's asynchronous copies to the host, before the host reads or writes the state."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class MasterWithDeviceGrad:
    """A host master shard as megatron-core's gradient norm, clipping and zero count see it (they read ``.grad``
    of the optimizer's parameters, and a host tensor cannot hold a device gradient): the master's attributes
    (tensor-parallel, shared, grad-norm group) and its gradient on the device."""

    __slots__ = ("master", "grad")

    def __init__(self, master: torch.Tensor, grad: torch.Tensor | None):
        self.master = master
        self.grad = grad

    def __getattr__(self, name):
        return getattr(self.master, name)


class HostStateStep:
    """Mixin for MuonClip (before it in the bases): state and master weights on the host, the step streamed (see
    the module). ``attach_host_state`` says where the device is and how to write the model weights; ``device_grads``
    ({master: its gradient on the device}) is set before every step by the megatron wrapper."""

    state_on_host = True

    def attach_host_state(self, *, device: torch.device, piece_elements: int, host_masters: list[torch.Tensor],
                          write_model: Callable[[torch.Tensor, int, torch.Tensor], None]) -> None:
        self.device = device
        self.piece_elements = piece_elements
        self.host_master_ids = {id(m) for m in host_masters}
        self.write_model = write_model  # (master, first element, its updated piece on the device)
        self.device_grads: dict = {}
        self._deferred: dict[int, Callable[[torch.Tensor, int, int], None]] = {}

    # ---- where things are --------------------------------------------------------------------------------------

    def _state_of(self, p: torch.Tensor, use_muon: bool) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state[self.MOMENTUM_KEY] = host_tensor(p, self.device, copy=False)
            if not use_muon:
                state["exp_avg_sq"] = host_tensor(p, self.device, copy=False)
        return state

    def host_state_bytes(self) -> int:
        """Bytes of host memory the optimizer state and the master weights take."""
        tensors = [t for s in self.state.values() for k, t in s.items() if k != "step"]
        tensors += [p for g in self.param_groups for p in g["params"] if id(p) in self.host_master_ids]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")

    def _pieces(self, p: torch.Tensor):
        return ((lo, min(lo + self.piece_elements, p.numel())) for lo in range(0, p.numel(), self.piece_elements))

    def _to_device(self, t: torch.Tensor, lo: int, hi: int, on_host: bool = True) -> torch.Tensor:
        """Elements [lo, hi) of flat ``t`` on the device: a copy of a host tensor, else a view."""
        if not on_host:
            return t.view(-1)[lo:hi]
        piece = torch.empty(hi - lo, dtype=t.dtype, device=self.device)
        piece.copy_(t.view(-1)[lo:hi], non_blocking=True)
        return piece

    def device_pieces(self, t: torch.Tensor):
        """(first element, a device copy of the piece) for each piece of host tensor ``t``."""
        for lo, hi in self._pieces(t):
            yield lo, self._to_device(t, lo, hi)

    def _to_host(self, t: torch.Tensor, lo: int, piece: torch.Tensor, on_host: bool = True) -> None:
        if on_host:
            t.view(-1)[lo:lo + piece.numel()].copy_(piece, non_blocking=True)

    def _update_weight(self, p: torch.Tensor, lo: int, hi: int, update) -> torch.Tensor:
        """Elements [lo, hi) of master ``p`` on the device after ``update(weight piece, lo, hi)``."""
        on_host = id(p) in self.host_master_ids
        w = self._to_device(p, lo, hi, on_host)
        update(w, lo, hi)
        return w

    def _finish_weight(self, p: torch.Tensor, lo: int, w: torch.Tensor) -> None:
        on_host = id(p) in self.host_master_ids
        if on_host:
            self.write_model(p, lo, w)
        self._to_host(p, lo, w, on_host)

    # ---- the step ----------------------------------------------------------------------------------------------

    def _clipped_master_ids(self) -> set[int]:
        return {id(s.flat) for t in self.qk_clip_targets.values() for s in (t.w_q_up, t.w_kv_up) if s is not None}

    def _muon_step(self) -> None:
        self._deferred = {}
        items = []
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            for p in group["params"]:
                grad = self.device_grads.get(p)
                if grad is None:
                    continue
                state = self._state_of(p, True)
                self._advance_step(group, state)
                for lo, hi in self._pieces(p):
                    self._momentum_piece(state[self.MOMENTUM_KEY], grad[lo:hi], lo, group)
                items.append((group, p, grad))
        clipped = self._clipped_master_ids()
        for (group, p, _), ortho in zip(items, self.orthogonalize(items)):
            flat = ortho.reshape(-1)

            def update(w, lo, hi, flat=flat, group=group):
                apply_decoupled_update_(w, flat[lo:hi], group["lr"], group["weight_decay"])
            self._stream_update(p, update, clipped)

    def _momentum_piece(self, momentum: torch.Tensor, grad: torch.Tensor, lo: int, group: dict) -> None:
        """M = mu M + G for elements [lo, lo + len(grad)) on the device, the matrix to orthogonalise written over the
        gradient it consumed (its device copies die on return, before the next piece's)."""
        m = self._to_device(momentum, lo, lo + grad.numel())
        grad.copy_(muon_momentum_(m, grad, group["momentum"], group["nesterov"]))
        self._to_host(momentum, lo, m)

    def _adamw_group_step(self, group: dict) -> None:
        clipped = self._clipped_master_ids()
        for p in group["params"]:
            grad = self.device_grads.get(p)
            if grad is None:
                continue
            state = self._state_of(p, False)
            step = self._advance_step(group, state)

            def update(w, lo, hi, grad=grad, state=state, step=step):
                m = self._to_device(state["exp_avg"], lo, hi)
                v = self._to_device(state["exp_avg_sq"], lo, hi)
                adamw_step_(w, grad[lo:hi], m, v, step, lr=group["lr"], betas=group["adamw_betas"],
                            eps=group["adamw_eps"], weight_decay=group["weight_decay"])
                self._to_host(state["exp_avg"], lo, m)
                self._to_host(state["exp_avg_sq"], lo, v)
            self._stream_update(p, update, clipped)

    def _stream_update(self, p: torch.Tensor, update, clipped: set[int]) -> None:
        """``update`` applied to master ``p`` piece by piece; a weight QK-Clip may rescale waits for it, whole."""
        if id(p) in clipped:
            self._deferred[id(p)] = update
            return
        for lo, hi in self._pieces(p):
            self._finish_weight(p, lo, self._update_weight(p, lo, hi, update))

    def _apply_qk_clip(self, max_logits: dict[str, torch.Tensor]) -> None:
        """Per layer: its up-projections' masters on the device, their deferred update, QK-Clip, written back."""
        self.qk_clip_stats = {}
        for name, logits in max_logits.items():
            target = self.qk_clip_targets[name]
            on_device = {}
            for shard in (target.w_q_up, target.w_kv_up):
                if shard is not None and id(shard.flat) not in on_device:
                    p = shard.flat
                    update = self._deferred.pop(id(p), lambda w, lo, hi: None)
                    on_device[id(p)] = (p, self._update_weight(p, 0, p.numel(), update))

            def moved(shard):
                return None if shard is None else WeightShard(on_device[id(shard.flat)][1], shard.start, shard.rows,
                                                              shard.cols)
            clipped = qk_clip_(moved(target.w_q_up), moved(target.w_kv_up), logits, target.layout,
                               tau=self.qk_clip_tau, alpha=self.qk_clip_alpha, checked_finite=True)
            for p, w in on_device.values():
                self._finish_weight(p, 0, w)
            self.qk_clip_stats[name] = QKClipStats(max_logits=logits, clipped=clipped)
        if self._deferred:  # every weight QK-Clip may rescale is registered with a layer whose logits were taken
            raise RuntimeError(f"MuonClip (optimizer state on host): {len(self._deferred)} weights left un-updated")
