"""MuonClip on megatron-core models: ZeRO-1 distributed optimizer, TP, EP, PP / virtual stages, global QK-Clip.

    opt = get_muonclip_optimizer(OptimizerConfig(lr=2e-4, bf16=True, use_distributed_optimizer=True), model_chunks)
    ... forward_backward_func(...) ...
    update_successful, grad_norm, _ = opt.step()
    opt.qk_clip_stats  # {layer: QKClipStats (per-head max logits, clipped heads)} of the last step

Structure (K2 report sections 2 and 4): megatron-core's parameter groups (its weight-decay rules and lr
multipliers) and gradient buffers, one optimizer for dense and one for expert parameters, fp32 master weights;
each is one of megatron's optimizer wrappers built with ``k2_megatron.optim.MuonClip`` as its inner optimizer,
working on megatron's master weights (flat shards under ZeRO-1), as KellerJordan's Muon keeps a distributed
and a local variant:
- ``MuonClipDistributedOptimizer`` (ZeRO-1, megatron's DistributedOptimizer): Newton-Schulz always sees whole
  matrices. The momentum of each gradient bucket is all-gathered over the data-parallel ranks, every matrix is
  orthogonalised ONCE by the rank that owns it (matrices dealt to ranks by Newton-Schulz cost, batched by shape
  through our kernel), and a reduce-scatter hands each rank its shard of the update; momentum stays sharded.
  A bucket larger than ``MuonClipConfig.buffer_bytes`` is streamed: runs of consecutive matrices within that many
  fp32 bytes are gathered (all-reduce of each rank's pieces), orthogonalised and scattered one after the other; the
  owner orthogonalises its matrices in Newton-Schulz calls whose working set fits the same budget, writing each
  result over its gathered momentum. With the finiteness check's pieces (below), the step's temporaries stay within
  about twice the budget (k2_megatron.config.memory; a single matrix larger than the budget goes alone).
- ``MuonClipFloat16Optimizer`` / ``MuonClipFP32Optimizer`` (megatron's replicated wrappers): whole matrices
  already.
  In both, a tensor-parallel matrix is all-gathered over its TP group before Newton-Schulz and sliced after, so
  the result equals the unsharded one. Expert stacks [E, n, m] count as E matrices (each EP rank its local
  experts), and SwiGLU's fused fc1 [gate; up] (dense MLP, shared expert, every routed expert) as two: Muon works
  per weight matrix, as in K2 (k2_megatron.optim.set_row_matrices; the model builder marks them). Muon for the
  hidden matrices (``k2_megatron.optim.uses_muon``: 2-D weights and 3-D expert stacks, not the embeddings, the
  output layer or the router), AdamW for the rest.
- QK-Clip runs inside the inner step on the master weights, before megatron copies them into the bf16 model
  weights, so both copies are clipped. ``MuonClipChainedOptimizer.step`` takes every attention layer's max
  logits once per step (k2_megatron.megatron.attention.take_global_max_attn_logits: all-reduced (MAX) over data-
  and context-parallel ranks) and hands them to the inner optimizers; with QK-Clip off it still reads them for
  ``qk_clip_stats`` (the run's log).
- Non-finite gradients and missing or non-finite max logits are detected on every rank and agreed on by all
  ranks before anything is updated (a rank raising alone would leave the others waiting in a collective). The
  gradient buffers are checked in pieces within the budget (``torch.isfinite`` holds 7 bytes per fp32 element).
With ``MuonClipConfig.state_on_host`` (ZeRO-1) the master shards and the state live in pinned host memory and the
step streams them through the device in pieces within the budget (k2_megatron.megatron.host_state).
Optimizer state (master weights, momentum, Adam moments, step) is saved and loaded with megatron's dist_checkpointing
in model space (``MuonClipChainedOptimizer.sharded_state_dict``, k2_megatron.megatron.optimizer_state), so a run
resumes on any other TP / PP / EP / DP layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer import (ChainedOptimizer, OptimizerConfig, _get_param_groups_and_buffers,
                                     check_config_overrides_consistency, get_standard_config_overrides)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import (SEPARATE_GRAD_NORM_GROUPS, FP32Optimizer,
                                               Float16OptimizerWithFloat16Params, copy_optimizer_param_metadata)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from k2_megatron.megatron import host_state, multi_tensor, optimizer_state
from k2_megatron.config.memory import (DEFAULT_MUON_BUFFER_MIB, muon_gather_spans, newton_schulz_batches,
                                       streamed_piece_elements)
from k2_megatron.megatron.attention import K2MLACoreAttention, take_global_max_attn_logits
from k2_megatron.megatron.layout import all_reduce_on_backend, collective_device
from k2_megatron.ops import DEFAULT_COEFFICIENTS
from k2_megatron.optim.muon import MUON_UPDATE_SCALE, matrix_shape, muon_orthogonalize
from k2_megatron.optim.muonclip import (DEFAULT_ADAMW_PATTERNS, MuonClip, NonFiniteGradientError, QKClipStats,
                                        all_finite, uses_muon)
from k2_megatron.optim.qk_clip import QK_CLIP_ALPHA, QK_CLIP_TAU, MLAHeadLayout, WeightShard, check_qk_clip_args


@dataclass
class MuonClipConfig:
    """MuonClip settings on top of megatron's OptimizerConfig (lr, weight_decay, adam_beta1/2, adam_eps)."""

    momentum: float = 0.95
    nesterov: bool = False
    ns_steps: int = 5
    ns_coefficients: tuple = DEFAULT_COEFFICIENTS
    ns_eps: float = 1e-7
    ns_dtype: torch.dtype = torch.bfloat16
    update_scale: float = MUON_UPDATE_SCALE
    qk_clip_tau: float | None = QK_CLIP_TAU
    qk_clip_alpha: float = QK_CLIP_ALPHA
    adamw_patterns: tuple[str, ...] = DEFAULT_ADAMW_PATTERNS
    nonfinite: str = "raise"  # or "skip": the step is skipped on every rank (step() returns False)
    # ZeRO-1: bytes of the fp32 buffers that gather a gradient bucket's momentum for Newton-Schulz at a time
    # (k2_megatron.config.memory.muon_gather_spans; a matrix larger than this is gathered alone)
    buffer_bytes: int = DEFAULT_MUON_BUFFER_MIB * 2**20
    # ZeRO-1: master weights and Muon / AdamW state in pinned host memory, the step streaming them through the
    # device in pieces within buffer_bytes (k2_megatron.megatron.host_state; the config's
    # memory.optimizer_state_on_host)
    state_on_host: bool = False

    def __post_init__(self):
        if not (isinstance(self.buffer_bytes, int) and self.buffer_bytes > 0):
            raise ValueError(f"MuonClipConfig: buffer_bytes must be an int > 0, got {self.buffer_bytes!r}")
        if not isinstance(self.state_on_host, bool):
            raise ValueError(f"MuonClipConfig: state_on_host must be a bool, got {self.state_on_host!r}")
        if self.qk_clip_tau is not None:
            check_qk_clip_args(self.qk_clip_tau, self.qk_clip_alpha)
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"MuonClipConfig: nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")


class _MegatronMuonClip(MuonClip):
    """MuonClip over megatron's master weights: Muon parameters may be flat ZeRO-1 shards, and the shards of
    fp32 parameters are views (non-leaf), as megatron's own inner Adam gets them."""

    # Muon's momentum is kept under "exp_avg", the name megatron gives an optimizer's first state tensor (the
    # checkpoint's optimizer.state.exp_avg.<parameter>, k2_megatron.megatron.optimizer_state).
    MOMENTUM_KEY = "exp_avg"

    # One step count for the whole optimizer, kept in the param groups (as TE's FusedAdam does; the checkpoint
    # saves it once); the per-parameter "step" tensor mirrors it for megatron's wrappers, which read it there.
    def _begin_step(self) -> None:
        for group in self.param_groups:
            group["step"] = int(group.get("step", 0)) + 1

    def _advance_step(self, group: dict, state: dict) -> int:
        state["step"] = torch.tensor(float(group["step"]))
        return int(group["step"])

    def _state_of(self, p: torch.Tensor, use_muon: bool) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            if not use_muon:
                state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    def add_param_group(self, param_group: dict) -> None:
        if "use_muon" not in param_group:
            raise ValueError("MuonClip: every param group needs 'use_muon'")
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        param_group["params"] = list(param_group["params"])
        self.param_groups.append(param_group)


class _HostStateMegatronMuonClip(host_state.HostStateStep, _MegatronMuonClip):
    """_MegatronMuonClip with its state and master weights in host memory, the step streamed through the device."""


def _megatron_muonclip(param_groups: list[dict], config: OptimizerConfig, muonclip: MuonClipConfig,
                       orthogonalize) -> _MegatronMuonClip | None:
    """The inner MuonClip of one megatron wrapper over megatron's param groups (None for none: a stub wrapper).
    Gradients are checked across all ranks by MuonClipChainedOptimizer.step, not here."""
    if not param_groups:
        return None
    for g in param_groups:
        g.setdefault("use_muon", False)
        # megatron's lr scheduler rewrites lr and weight_decay each step with these multipliers; start the same.
        g["lr"] = config.lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = config.weight_decay * g.get("wd_mult", 1.0)
    cls = _HostStateMegatronMuonClip if muonclip.state_on_host else _MegatronMuonClip
    return cls(
        param_groups, lr=config.lr, momentum=muonclip.momentum, nesterov=muonclip.nesterov,
        weight_decay=config.weight_decay, ns_steps=muonclip.ns_steps, ns_coefficients=muonclip.ns_coefficients,
        ns_eps=muonclip.ns_eps, ns_dtype=muonclip.ns_dtype, update_scale=muonclip.update_scale,
        adamw_betas=(config.adam_beta1, config.adam_beta2), adamw_eps=config.adam_eps,
        qk_clip_tau=muonclip.qk_clip_tau, qk_clip_alpha=muonclip.qk_clip_alpha, orthogonalize=orthogonalize,
        check_finite=False)


def _init_muonclip_state(optimizer: MuonClip, config=None) -> None:
    """megatron's init_state_fn: every parameter's state allocated before a checkpoint is loaded into it."""
    optimizer.init_state()


# ---------------------------------------------------------------------------------------------------------
# Newton-Schulz on whole matrices


@dataclass
class _Matrix:
    """One matrix Muon orthogonalises, as this rank holds it: a 2-D weight, expert e of a 3-D stack, or one of the
    matrices a parameter stacks along its rows (k2_megatron.optim.set_row_matrices: SwiGLU's gate and up)."""

    param: torch.nn.Parameter  # the model parameter
    offset: int  # first element of the matrix in the (local) parameter, row-major
    shape: tuple[int, int]  # local (TP-sharded) shape
    partition_dim: int | None  # TP split dimension of the matrix, None if not TP-sharded
    cost: float  # Newton-Schulz FLOPs of the whole matrix (owner balancing)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _matrices_of(param: torch.nn.Parameter, tp_size: int) -> list[_Matrix]:
    """The matrices of ``param`` in memory order. Under TP, a matrix of a parameter split along its rows is split
    the same way (megatron shards SwiGLU's fc1 as [gate_r; up_r] on TP rank r), so gathering it over TP along
    partition_dim gives the whole matrix."""
    shape = matrix_shape(param)
    pdim = None
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        pdim = param.partition_dim - (param.dim() - 2)  # megatron's partition_dim counts the expert dim
    full = list(shape)
    if pdim is not None:
        full[pdim] *= tp_size
    r, c = min(full), max(full)
    cost = 4.0 * r * r * c + 2.0 * r**3
    numel = shape[0] * shape[1]
    return [_Matrix(param, i * numel, shape, pdim, cost) for i in range(param.numel() // numel)]


def _orthogonalize_whole(local: list[torch.Tensor], partition_dims: list[int | None], group: dict,
                         tp_group) -> list[torch.Tensor]:
    """Muon's O for each local matrix, computed on the whole (TP-gathered) matrix, batched by shape; returns each
    rank's own slice. Every rank of ``tp_group`` must call this with the same shapes in the same order."""
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    buckets: dict[tuple, list[int]] = {}
    for i, (m, pdim) in enumerate(zip(local, partition_dims)):
        buckets.setdefault((tuple(m.shape), pdim), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(local)
    for (shape, pdim), indices in buckets.items():
        stacked = torch.stack([local[i] for i in indices])  # [k, n, m]
        if pdim is not None and tp_size > 1:
            gathered = torch.empty((tp_size * stacked.shape[0], *stacked.shape[1:]), dtype=stacked.dtype,
                                   device=stacked.device)
            dist.all_gather_into_tensor(gathered, stacked.contiguous(), group=tp_group)
            stacked = torch.cat(list(gathered.view(tp_size, *stacked.shape)), dim=1 + pdim)
        ortho = muon_orthogonalize(stacked, ns_steps=group["ns_steps"], ns_coefficients=group["ns_coefficients"],
                                   ns_eps=group["ns_eps"], ns_dtype=group["ns_dtype"], scale=group["update_scale"])
        if pdim is not None and tp_size > 1:
            ortho = ortho.chunk(tp_size, dim=1 + pdim)[tp_rank]
        for j, i in enumerate(indices):
            out[i] = ortho[j]
    return out


# ---------------------------------------------------------------------------------------------------------
# megatron's optimizer wrappers with MuonClip inside


class _MuonClipWrapper:
    """What the MuonClip wrappers share: megatron's process-group attributes (set by megatron's own factory on its
    wrappers), the map from inner (master) tensors to model parameters, and where QK-Clip finds each weight."""

    # whether the master weights and states are ZeRO-1 shards (the data-parallel ranks hold different pieces)
    dp_sharded = False

    def _init_muonclip(self, groups: _SubOptimizerGroups) -> None:
        self.grad_stats_parallel_group = groups.grad_stats
        self.tp_group = groups.tensor
        self.expert_tp_group = groups.expert_tensor
        self.matrices_orthogonalized = 0  # by this rank, since construction
        self.main_to_model = _main_to_model(self) if self.optimizer is not None else {}
        self._main_of = {model: main for main, model in self.main_to_model.items()}
        if self.optimizer is not None:
            self.optimizer.init_state()

    def weight_shard(self, weight: torch.nn.Parameter) -> WeightShard | None:
        """The piece of 2-D model weight ``weight`` this optimizer updates, as a flat WeightShard of its master
        copy (None: no piece of it here)."""
        if weight not in self._main_of:
            return None
        main = self._main_of[weight]
        return WeightShard(main if main.dim() == 1 else main.view(-1), self._first_element(weight), weight.shape[0],
                           weight.shape[1])

    def _first_element(self, model: torch.nn.Parameter) -> int:
        return 0


class MuonClipDistributedOptimizer(_MuonClipWrapper, DistributedOptimizer):
    """megatron's DistributedOptimizer (ZeRO-1) with MuonClip over the fp32 master shards. Newton-Schulz per
    gradient bucket: all-gather the momentum shards over the data-parallel group, orthogonalise each matrix once
    on its owner rank, reduce-scatter the result.

    Owners are dealt by Newton-Schulz cost (largest first, to the least-loaded rank), identically on every rank
    of the data-parallel group and of the TP group, so the TP all-gathers inside the owners' batches pair up.
    ``distributed``: DistributedOptimizer's own arguments (model_chunks, per_model_buffers, data_parallel_group,
    data_parallel_group_gloo, data_parallel_group_idx, distributed_optimizer_instance_id).
    """

    dp_sharded = True

    def __init__(self, param_groups: list[dict], config: OptimizerConfig, muonclip: MuonClipConfig, *, is_muon,
                 groups: _SubOptimizerGroups, **distributed):
        inner = _megatron_muonclip(param_groups, config, muonclip, self.orthogonalize)
        super().__init__(inner, config, None, _init_muonclip_state, **distributed)
        self.state_on_host = muonclip.state_on_host and inner is not None
        self._model_params_written = False  # by the streamed step (state on host)
        if self.state_on_host:
            self._masters_to_host(muonclip.buffer_bytes)
        self._init_muonclip(groups)
        self.muon_buffer_bytes = muonclip.buffer_bytes
        self.ns_plan, self.ns_load = self._deal_matrices(is_muon) if inner is not None else ([], [0.0])

    # ---- optimizer state on the host (k2_megatron.megatron.host_state) ----------------------------------------

    def _masters_to_host(self, budget_bytes: int) -> None:
        """Moves the fp32 master shards megatron made to the host (the same objects everywhere megatron and the
        inner optimizer hold them) and tells the inner optimizer; its state is created there."""
        device = self._bucket_device()
        inner_params = [g["params"] for g in self.optimizer.param_groups]
        hosts = []
        for models, mains in zip(self.model_float16_groups, self.shard_fp32_from_float16_groups):
            for i, (model, main) in enumerate(zip(models, mains)):
                host = host_state.host_tensor(main, device, copy=True)
                # the attributes megatron gives a master shard (tensor-parallel, grad-norm group, ...)
                tensor_parallel.copy_tensor_model_parallel_attributes(host, model)
                tensor_parallel.copy_gtp_attributes(host, model)
                copy_optimizer_param_metadata(host, model)
                for params in inner_params:
                    params[:] = [host if q is main else q for q in params]
                mains[i] = model.main_param = host
                hosts.append(host)
        self.optimizer.attach_host_state(device=device,
                                         piece_elements=streamed_piece_elements(budget_bytes),
                                         host_masters=hosts, write_model=self._write_model_piece)

    def _model_piece(self, main: torch.Tensor, first: int, numel: int) -> torch.Tensor:
        """Elements [first, first + numel) of master ``main``'s model weight, in megatron's parameter buffer."""
        model = self.main_to_model[main]
        world = self._get_model_param_range_map(model)["gbuf_world_in_bucket"]
        gbuf_index, _, bucket_id = self.model_param_gbuf_map[model]
        buffer = self.buffers[gbuf_index].buckets[bucket_id].param_data.view(-1)
        return buffer[world.start + first:world.start + first + numel]

    def _write_model_piece(self, main: torch.Tensor, first: int, piece: torch.Tensor) -> None:
        """The model weight from an updated master piece on the device (megatron's main-to-model copy, per piece)."""
        self._model_piece(main, first, piece.numel()).copy_(piece)
        self._model_params_written = True

    def _copy_model_grads_to_main_grads(self):
        if not self.state_on_host:
            return super()._copy_model_grads_to_main_grads()
        grads = {}
        for models, mains in ((self.model_float16_groups, self.shard_fp32_from_float16_groups),
                              (self.model_fp32_groups, self.shard_fp32_groups)):
            for model_group, main_group in zip(models, mains):
                for model, main in zip(model_group, main_group):
                    rng = self._get_model_param_range_map(model)["param"]
                    grads[main] = model.main_grad.view(-1)[rng.start:rng.end].float()
        self.optimizer.device_grads = grads

    def get_parameters(self):
        params = super().get_parameters()
        if not self.state_on_host:
            return params
        grads = self.optimizer.device_grads
        return [host_state.MasterWithDeviceGrad(p, grads.get(p)) for p in params]

    def _copy_main_params_to_model_params(self):
        if not self.state_on_host:
            return super()._copy_main_params_to_model_params()
        if self._model_params_written:  # by the step, piece by piece (fp32 model shards are the weights)
            self._model_params_written = False
            return
        for mains in self.shard_fp32_from_float16_groups:
            for main in mains:
                for first, piece in self.optimizer.device_pieces(main):
                    self._model_piece(main, first, piece.numel()).copy_(piece)

    def host_state_bytes(self) -> int:
        """Host memory of the optimizer state and master weights (0 unless the state is on the host)."""
        return self.optimizer.host_state_bytes() if self.state_on_host else 0

    def wait_for_host_state(self) -> None:
        if self.state_on_host:
            host_state.wait_for_host_state(self.optimizer.device)

    def _first_element(self, model: torch.nn.Parameter) -> int:
        return self._get_model_param_range_map(model)["param"].start

    def _deal_matrices(self, is_muon) -> tuple[list, list[float]]:
        """Per bucket (buffer index, bucket index, [(matrix, bucket-relative offset, owner rank)]), and the
        Newton-Schulz FLOPs dealt to each data-parallel rank."""
        dp_size = dist.get_world_size(self.data_parallel_group)
        tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        plan, load = [], [0.0] * dp_size
        for gbuf_idx, buffer in enumerate(self.buffers):
            for bucket_idx, bucket in enumerate(buffer.buckets):
                units = []
                params = sorted((p for p in bucket.params_list if is_muon(p)),
                                key=lambda p: buffer.param_index_map[p][0])
                for p in params:
                    start = buffer.param_index_map[p][0] - bucket.offset
                    for m in _matrices_of(p, tp_size):
                        units.append((m, start + m.offset))
                # Deal the matrices to DP ranks by cost (deterministic: ties broken by position).
                owners = {}
                for idx in sorted(range(len(units)), key=lambda i: (-units[i][0].cost, i)):
                    owner = min(range(dp_size), key=lambda r: (load[r], r))
                    owners[idx] = owner
                    load[owner] += units[idx][0].cost
                if units:
                    plan.append((gbuf_idx, bucket_idx, [(m, off, owners[i]) for i, (m, off) in enumerate(units)]))
        return plan, load

    def owned_cost(self) -> float:
        """This rank's Newton-Schulz FLOPs per step."""
        return self.ns_load[dist.get_rank(self.data_parallel_group)]

    def orthogonalize(self, items: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Muon's O of each (group, master shard, momentum shard), computed on whole matrices (see the class), each
        gradient bucket streamed through fp32 gather buffers of at most ``MuonClipConfig.buffer_bytes``
        (k2_megatron.config.memory.muon_gather_spans). The results are written over the master shards' gradients,
        which the momentum update has consumed, so nothing the size of the rank's shard is allocated."""
        dp_group = self.data_parallel_group
        dp_size, dp_rank = dist.get_world_size(dp_group), dist.get_rank(dp_group)
        group = items[0][0] if items else next((g for g in self.optimizer.param_groups if g["use_muon"]), None)
        update_of = {self.main_to_model[main]: update for _, main, update in items}
        out_of = {self.main_to_model[main]: _output_over_grad(self._main_grad(main), update)
                  for _, main, update in items}
        for gbuf_idx, bucket_idx, units in self.ns_plan:
            numel = self.buffers[gbuf_idx].buckets[bucket_idx].grad_data.numel()
            ranges = self._bucket_ranges(units, dp_rank * (numel // dp_size))
            whole, spans = muon_gather_spans([(off, m.numel) for m, off, _ in units], numel, dp_size,
                                             self.muon_buffer_bytes)
            first = 0
            for start, end, count in spans:
                span_units, first = units[first:first + count], first + count
                full = (self._gather_bucket(numel, ranges, update_of) if whole else
                        self._gather_span(start, end, ranges, update_of))
                mine = [(m, off - start) for m, off, owner in span_units if owner == dp_rank]
                self._orthogonalize_in_place(full, mine, group)
                if whole:
                    self._scatter_bucket(full, ranges, out_of)
                else:
                    dist.all_reduce(full, group=dp_group)
                    _copy_pieces(full, start, ranges, out_of, into_params=True)
                del full
        return [out_of[self.main_to_model[main]] for _, main, _ in items]

    def _orthogonalize_in_place(self, full: torch.Tensor, mine: list[tuple[_Matrix, int]], group: dict) -> None:
        """Turns gathered momentum ``full`` into this rank's part of the result: Muon's O of each of its matrices
        ``mine`` ((matrix, offset in ``full``)) written over its momentum, zeros elsewhere (the ranks' parts are
        summed). Same-shaped matrices are orthogonalised together, in calls whose working set fits the budget
        (k2_megatron.config.memory.newton_schulz_batches), identically on every rank of the TP group."""
        tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        for batch in _newton_schulz_batches(mine, tp_size, self.muon_buffer_bytes):
            self._orthogonalize_batch(full, batch, group)
        self.matrices_orthogonalized += len(mine)
        end = 0
        for m, off in sorted(mine, key=lambda item: item[1]):
            full[end:off].zero_()
            end = off + m.numel
        full[end:].zero_()

    def _orthogonalize_batch(self, full: torch.Tensor, batch: list[tuple[_Matrix, int]], group: dict) -> None:
        """One Newton-Schulz call: Muon's O of the matrices ``batch`` written over them in ``full`` (its temporaries
        die on return, before the next call)."""
        ortho = _orthogonalize_whole([full[off:off + m.numel].view(m.shape) for m, off in batch],
                                     [m.partition_dim for m, _ in batch], group, self.tp_group)
        for (m, off), o in zip(batch, ortho):
            full[off:off + m.numel] = o.reshape(-1)

    def _bucket_ranges(self, units, shard_start: int) -> dict:
        """{model parameter: (start, end)} of this rank's piece of each parameter of ``units``, in the bucket."""
        ranges = {}
        for p in {m.param for m, _, _ in units}:
            try:
                rmap = self._get_model_param_range_map(p)
            except KeyError:
                continue  # no piece of this parameter on this rank
            ranges[p] = (shard_start + rmap["gbuf_local"].start, shard_start + rmap["gbuf_local"].end)
        return ranges

    def _gather_bucket(self, numel: int, ranges: dict, update_of: dict) -> torch.Tensor:
        """The bucket's momentum, all-gathered from every rank's shard (fp32)."""
        shard = numel // dist.get_world_size(self.data_parallel_group)
        shard_start = dist.get_rank(self.data_parallel_group) * shard
        local = torch.zeros(shard, dtype=torch.float32, device=self._bucket_device())
        _copy_pieces(local, shard_start, ranges, update_of, into_params=False)
        full = torch.empty(numel, dtype=torch.float32, device=local.device)
        dist.all_gather_into_tensor(full, local, group=self.data_parallel_group)
        return full

    def _scatter_bucket(self, full: torch.Tensor, ranges: dict, out_of: dict) -> None:
        """Each rank's shard of the bucket's result (summed over the ranks) into its parameters' outputs."""
        shard = full.numel() // dist.get_world_size(self.data_parallel_group)
        local = torch.empty(shard, dtype=full.dtype, device=full.device)
        dist.reduce_scatter_tensor(local, full, group=self.data_parallel_group)
        _copy_pieces(local, dist.get_rank(self.data_parallel_group) * shard, ranges, out_of, into_params=True)

    def _gather_span(self, start: int, end: int, ranges: dict, update_of: dict) -> torch.Tensor:
        """Elements [start, end) of the bucket's momentum: every rank's pieces summed (all-reduce) into zeros."""
        span = torch.zeros(end - start, dtype=torch.float32, device=self._bucket_device())
        _copy_pieces(span, start, ranges, update_of, into_params=False)
        dist.all_reduce(span, group=self.data_parallel_group)
        return span

    def _bucket_device(self) -> torch.device:
        return self.buffers[0].grad_data.device

    def _main_grad(self, main: torch.Tensor) -> torch.Tensor | None:
        return self.optimizer.device_grads.get(main) if self.state_on_host else main.grad


def _newton_schulz_batches(mine: list[tuple[_Matrix, int]], tp_size: int, budget_bytes: int) -> list[list]:
    """``mine`` grouped by shape and TP split (in order of first appearance), each group cut into the Newton-Schulz
    calls of newton_schulz_batches over the whole (TP-gathered) matrices."""
    groups: dict[tuple, list] = {}
    for m, off in mine:
        groups.setdefault((m.shape, m.partition_dim), []).append((m, off))
    batches = []
    for members in groups.values():
        whole = [m.numel * (tp_size if m.partition_dim is not None else 1) for m, _ in members]
        first = 0
        for count in newton_schulz_batches(whole, budget_bytes):
            batches.append(members[first:first + count])
            first += count
    return batches


def _copy_pieces(buf: torch.Tensor, buf_start: int, ranges: dict, tensors: dict, *, into_params: bool) -> None:
    """Copies between ``buf`` (bucket elements from ``buf_start``) and the flat tensors of the parameters in
    ``ranges`` ({param: (start, end) of its piece on this rank, in the bucket}), where the two overlap:
    buf -> tensors[param] with ``into_params``, else tensors[param] -> buf (parameters without one: left zero)."""
    buf_end = buf_start + buf.numel()
    for p, (lo, hi) in ranges.items():
        a, b = max(lo, buf_start), min(hi, buf_end)
        if a >= b or p not in tensors:
            continue
        piece = tensors[p].view(-1)[a - lo:b - lo]
        if into_params:
            piece.copy_(buf[a - buf_start:b - buf_start])
        else:
            buf[a - buf_start:b - buf_start] = piece


def _output_over_grad(grad: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    """Where Muon's O of a master shard goes: over its gradient ``grad`` (a view of megatron's fp32 gradient buffer,
    consumed by the momentum update before orthogonalisation), else a new tensor."""
    if grad is not None and grad.dtype == update.dtype and grad.shape == update.shape and grad.is_contiguous():
        return grad
    return torch.empty_like(update)


class _ReplicatedMuonClip(_MuonClipWrapper):
    """For megatron's wrappers whose master weights are whole (TP-local) parameters."""

    def orthogonalize(self, items: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Muon's O of each (group, master weight, momentum), batched by shape, TP-split matrices made whole."""
        tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        local, pdims, places = [], [], []
        for k, (group, main, update) in enumerate(items):
            for m in _matrices_of(self.main_to_model[main], tp_size):
                local.append(update.reshape(-1)[m.offset:m.offset + m.numel].view(m.shape))
                pdims.append(m.partition_dim)
                places.append((k, m))
        self.matrices_orthogonalized += len(local)
        ortho = _orthogonalize_whole(local, pdims, items[0][0], self.tp_group) if local else []
        out = [torch.empty_like(update) for _, _, update in items]
        for (k, m), o in zip(places, ortho):
            out[k].view(-1)[m.offset:m.offset + m.numel] = o.reshape(-1)
        return out


class MuonClipFloat16Optimizer(_ReplicatedMuonClip, Float16OptimizerWithFloat16Params):
    """megatron's Float16OptimizerWithFloat16Params (bf16 model, fp32 master weights) with MuonClip inside."""

    def __init__(self, param_groups: list[dict], config: OptimizerConfig, muonclip: MuonClipConfig, *,
                 groups: _SubOptimizerGroups):
        super().__init__(_megatron_muonclip(param_groups, config, muonclip, self.orthogonalize), config, None,
                         _init_muonclip_state)
        self._init_muonclip(groups)


class MuonClipFP32Optimizer(_ReplicatedMuonClip, FP32Optimizer):
    """megatron's FP32Optimizer (fp32 model, no master copies) with MuonClip inside."""

    def __init__(self, param_groups: list[dict], config: OptimizerConfig, muonclip: MuonClipConfig, *,
                 groups: _SubOptimizerGroups):
        super().__init__(_megatron_muonclip(param_groups, config, muonclip, self.orthogonalize), config,
                         _init_muonclip_state)
        self._init_muonclip(groups)


def _named_params(model_chunks) -> dict:
    return {p: name for chunk in model_chunks for name, p in chunk.named_parameters()}


def _main_to_model(sub) -> dict:
    """The inner optimizer's tensors (master weights or their shards) -> megatron model parameters."""
    mapping = {}
    if isinstance(sub, DistributedOptimizer):
        for models, mains in ((sub.model_float16_groups, sub.shard_fp32_from_float16_groups),
                              (sub.model_fp32_groups, sub.shard_fp32_groups)):
            for model_group, main_group in zip(models, mains):
                mapping.update(zip(main_group, model_group))
    else:
        for group in getattr(sub, "float16_groups", []):
            for p in group:
                mapping[p.main_param] = p
        for group in sub.optimizer.param_groups:
            for p in group["params"]:
                mapping.setdefault(p, p)
    return mapping


def attention_layer_name(layer: int) -> str:
    """The name of layer ``layer``'s attention (0-based, global) in qk_clip_stats and the logs."""
    return f"layers.{layer}.self_attention"


def _attention_layers(model_chunks, qk_clip: bool) -> list[tuple[str, MLASelfAttention]]:
    """(unique name, MLA self-attention module) of every layer in the chunks (global layer numbers) whose core
    attention records max logits (K2MLACoreAttention); with QK-Clip on, every one must."""
    layers = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if not isinstance(module, MLASelfAttention):
                continue
            name = attention_layer_name(module.layer_number - 1)
            if isinstance(module.core_attention, K2MLACoreAttention):
                layers.append((name, module))
            elif qk_clip:
                raise ValueError(f"MuonClip: QK-Clip needs every attention layer's max logits, but the core attention "
                                 f"of {name} is a {type(module.core_attention).__name__}, which records none (build "
                                 "the model with the K2 spec, k2_megatron.megatron.spec)")
    return layers


def _layout_of(attn) -> MLAHeadLayout:
    c = attn.config
    return MLAHeadLayout(attn.num_attention_heads_per_partition, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim)


def _q_up_weight(attn):
    return attn.linear_q_up_proj.weight if hasattr(attn, "linear_q_up_proj") else attn.linear_q_proj.weight


def _check_config(config: OptimizerConfig, model_chunks) -> None:
    if config.optimizer != "adam":
        raise ValueError(f"get_muonclip_optimizer: OptimizerConfig.optimizer must be 'adam' (the AdamW half of "
                         f"MuonClip), got {config.optimizer!r}")
    for field in ("use_precision_aware_optimizer", "optimizer_cpu_offload"):
        if getattr(config, field, False):
            raise ValueError(f"get_muonclip_optimizer: OptimizerConfig.{field} is not supported with MuonClip")
    if not getattr(config, "decoupled_weight_decay", True):
        raise ValueError("get_muonclip_optimizer: MuonClip uses decoupled weight decay (decoupled_weight_decay=True)")
    if config.fp16 or config.loss_scale:
        raise ValueError("get_muonclip_optimizer: MuonClip runs bf16 or fp32 without loss scaling (got fp16="
                         f"{config.fp16}, loss_scale={config.loss_scale})")
    if config.overlap_param_gather_with_optimizer_step:
        raise ValueError("get_muonclip_optimizer: overlap_param_gather_with_optimizer_step is not supported")
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    if ddp_config is not None and ddp_config.use_megatron_fsdp:
        raise ValueError("get_muonclip_optimizer: megatron FSDP is not supported; use ZeRO-1 "
                         "(use_distributed_optimizer=True)")
    if ddp_config is not None and ddp_config.num_distributed_optimizer_instances > 1:
        raise ValueError(f"get_muonclip_optimizer: num_distributed_optimizer_instances="
                         f"{ddp_config.num_distributed_optimizer_instances} is not supported (1: one ZeRO-1 group)")


# ---------------------------------------------------------------------------------------------------------
# building


@dataclass(frozen=True)
class _SubOptimizerGroups:
    """The process groups of one sub-optimizer (dense or expert parameters), as megatron-core's factory picks them."""

    model_parallel: dist.ProcessGroup     # the ranks holding one copy of these parameters, split
    data_parallel: dist.ProcessGroup      # ZeRO-1 shards the optimizer state over it
    data_parallel_gloo: dist.ProcessGroup | None
    grad_stats: dist.ProcessGroup         # gradient norm and zero counts are reduced over it
    tensor: dist.ProcessGroup             # TP-split matrices are made whole over it for Newton-Schulz
    expert_tensor: dist.ProcessGroup


def _sub_optimizer_groups(model_chunks: list, expert: bool, distributed: bool) -> _SubOptimizerGroups:
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(None, model_chunks,
                                                                       use_gloo_process_groups=True)
    mpu = ProcessGroupCollection.use_mpu_process_groups()
    model_parallel = groups["expt_tp_pp_with_egtp_remat_group" if expert else "mp_group"]
    return _SubOptimizerGroups(
        model_parallel=model_parallel, data_parallel=groups["intra_expt_dp_group" if expert else "intra_dp_cp_group"],
        data_parallel_gloo=groups["intra_expt_dp_group_gloo" if expert else "intra_dp_cp_group_gloo"],
        grad_stats=groups["intra_dist_opt_group"] if distributed else model_parallel, tensor=mpu.tp,
        expert_tensor=getattr(mpu, "expt_tp", mpu.tp))


def get_muonclip_optimizer(config: OptimizerConfig, model_chunks: list,
                           muonclip: MuonClipConfig | None = None) -> MuonClipChainedOptimizer:
    """The optimizer of ``model_chunks`` (DDP-wrapped, as for megatron's get_megatron_optimizer): megatron's
    parameter groups and wrappers with MuonClip inside, ZeRO-1 when ``config.use_distributed_optimizer``, mixed
    precision per ``config``; one sub-optimizer for dense and one for expert parameters. Gradient clipping uses
    k2_megatron.megatron.multi_tensor's device-side norm and scaling where megatron would use its local fallbacks."""
    multi_tensor.install()
    muonclip = muonclip or MuonClipConfig()
    model_chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    _check_config(config, model_chunks)
    if muonclip.state_on_host and not config.use_distributed_optimizer:
        raise ValueError("get_muonclip_optimizer: MuonClipConfig.state_on_host (memory.optimizer_state_on_host) needs "
                         "the distributed optimizer (OptimizerConfig.use_distributed_optimizer=True)")
    names = _named_params(model_chunks)

    def is_muon(p, name=None) -> bool:
        return uses_muon(name if name is not None else names.get(p, ""), p, muonclip.adamw_patterns)

    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(with_name_predicate=ParamWithNamePredicate(name="k2_muon", fn=is_muon))] = {"use_muon": True}
    check_config_overrides_consistency(config, overrides)
    subs = []
    for expert in (False, True):
        param_groups, buffers = _get_param_groups_and_buffers(
            model_chunks, model_chunk_offset=0, config=config, config_overrides=overrides,
            filter_fn=lambda g, expert=expert: g["is_expert_parallel"] == expert,
            buffer_name="expert_parallel_buffers" if expert else "buffers")
        if expert and not param_groups:
            continue  # no experts on this rank's chunks: no expert optimizer (as megatron)
        groups = _sub_optimizer_groups(model_chunks, expert, config.use_distributed_optimizer)
        if config.use_distributed_optimizer:
            subs.append(MuonClipDistributedOptimizer(
                param_groups, config, muonclip, is_muon=is_muon, groups=groups, model_chunks=model_chunks,
                per_model_buffers=buffers, data_parallel_group=groups.data_parallel,
                data_parallel_group_gloo=groups.data_parallel_gloo,
                data_parallel_group_idx=dist.get_rank(groups.model_parallel), distributed_optimizer_instance_id=0))
        else:
            wrapper = MuonClipFloat16Optimizer if config.bf16 else MuonClipFP32Optimizer
            subs.append(wrapper(param_groups, config, muonclip, groups=groups))
    return MuonClipChainedOptimizer(subs, muonclip, model_chunks)


class MuonClipChainedOptimizer(ChainedOptimizer):
    """megatron-core's ChainedOptimizer of the MuonClip sub-optimizers, plus the global checks and the QK-Clip
    bookkeeping that must agree across ranks."""

    def __init__(self, chained_optimizers, muonclip: MuonClipConfig, model_chunks: list):
        super().__init__(chained_optimizers)
        self._agree_on_grad_norm_groups()
        self.muonclip = muonclip
        self.model_chunks = model_chunks
        self.attention_layers = _attention_layers(model_chunks, qk_clip=muonclip.qk_clip_tau is not None)
        self.qk_clip_stats: dict[str, QKClipStats] = {}
        self.skipped_steps = 0
        self.nonfinite_gradient: str | None = None  # where the last refused step found them (_first_nonfinite_gradient)
        self._step_max_logits: dict[str, torch.Tensor] = {}  # this step's global max logits, during step()
        if muonclip.qk_clip_tau is not None:
            for name, attn in self.attention_layers:
                self._register_qk_clip(name, attn)

    def _agree_on_grad_norm_groups(self) -> None:
        """megatron asks, the first time it clips, whether any rank holds parameters of each separate gradient-norm
        group (an all-reduce and a host read each, cached for the run: has_grad_norm_group). Asked here, while the
        optimizer is built on every rank, the training steps make no such read."""
        for group in SEPARATE_GRAD_NORM_GROUPS:
            self.has_grad_norm_group(group)

    def _register_qk_clip(self, name: str, attn: MLASelfAttention) -> None:
        layout = _layout_of(attn)
        w_q, w_kv = _q_up_weight(attn), attn.linear_kv_up_proj.weight
        for sub in self.chained_optimizers:
            if sub.optimizer is None:
                continue
            q, kv = sub.weight_shard(w_q), sub.weight_shard(w_kv)
            if q is not None or kv is not None:
                sub.optimizer.register_attention(name, w_q_up=q, w_kv_up=kv, layout=layout,
                                                 max_logits=partial(self._max_logits_of, name))

    def _max_logits_of(self, name: str) -> torch.Tensor | None:
        return self._step_max_logits.get(name)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata: dict | None = None):
        """The optimizer state in model space (k2_megatron.megatron.optimizer_state): loads on any TP / PP / EP / DP
        layout, with or without the distributed optimizer. Its tensors are views of the live state (a load
        reads into them in place), which the host may read or write once the step's copies to it are done."""
        self.wait_for_host_state()
        return optimizer_state.sharded_state_dict(self.chained_optimizers, model_sharded_state_dict)

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        """Completes a load of ``sharded_state_dict`` (its tensors were read in place): the step count."""
        optimizer_state.load_state_dict(self.chained_optimizers, state_dict)

    def wait_for_host_state(self) -> None:
        """Waits for the last step's copies of optimizer state to the host (memory.optimizer_state_on_host)."""
        for sub in self.chained_optimizers:
            if isinstance(sub, MuonClipDistributedOptimizer):
                sub.wait_for_host_state()

    def host_state_bytes(self) -> int:
        """Host memory this rank's optimizer state and master weights take (0 unless they are on the host)."""
        return sum(sub.host_state_bytes() for sub in self.chained_optimizers
                   if isinstance(sub, MuonClipDistributedOptimizer))

    def _agree(self, flags: list[torch.Tensor]) -> list[bool]:
        """Element-wise OR of 0-d flags over all ranks: one reduction, one host read."""
        device = collective_device()
        t = all_reduce_on_backend(torch.stack([f.to(device, torch.float32) for f in flags]), op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _grad_buffers(self) -> list[torch.Tensor]:
        return [b.grad_data for chunk in self.model_chunks
                for b in (*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", []))]

    @torch.no_grad()
    def step(self):
        logits, missing = take_global_max_attn_logits(self.attention_layers)
        qk_clip = self.muonclip.qk_clip_tau is not None  # without it the logits are only logged
        grads_bad, missing_any, logits_bad_any = self._agree([
            ~all_finite(self._grad_buffers(), self.muonclip.buffer_bytes), torch.tensor(qk_clip and bool(missing)),
            ~all_finite(logits.values()) if qk_clip else torch.tensor(False)])
        if missing_any:
            raise RuntimeError(f"MuonClip: attention layers recorded no max logits this step (no forward since the "
                               f"last step?): {missing or 'on another rank'}")
        if logits_bad_any:
            logits_bad = [n for n, v in logits.items() if not bool(torch.isfinite(v).all())]  # the error's detail
            raise ValueError("MuonClip: non-finite max attention logits (the forward overflowed or produced NaN); "
                             f"refusing to clip. This rank: {logits_bad}")
        if grads_bad:
            self.nonfinite_gradient = self._first_nonfinite_gradient()
            if self.muonclip.nonfinite == "raise":
                raise NonFiniteGradientError(f"MuonClip: non-finite gradients on at least one rank "
                                             f"({self.nonfinite_gradient}); nothing was updated")
            self.skipped_steps += 1
            self.qk_clip_stats = self._layer_stats(logits, tau=None)  # seen, nothing clipped
            return False, None, None
        self._step_max_logits = logits
        try:
            result = super().step()
        finally:
            self._step_max_logits = {}
        self.qk_clip_stats = self._layer_stats(logits, tau=self.muonclip.qk_clip_tau)
        return result

    def _first_nonfinite_gradient(self) -> str:
        """Where the inf/NaN gradients are, said in a few words: this rank's first parameter (model order) whose
        gradient holds one, or "on another rank". Looked for only once a step is known to be bad."""
        for chunk in self.model_chunks:
            for name, param in chunk.module.named_parameters():
                grad = getattr(param, "main_grad", None)
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    return f"first on this rank: {name}"
        return "on another rank"

    def _layer_stats(self, logits: dict[str, torch.Tensor], tau: float | None) -> dict[str, QKClipStats]:
        """QKClipStats of each of this rank's layers over all of its heads (TP ranks' heads gathered), heads above
        ``tau`` clipped (None: none)."""
        if not logits:
            return {}
        names = list(logits)
        local = torch.stack([logits[n] for n in names])  # [layers, heads on this TP rank]
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_size = dist.get_world_size(tp_group)
        heads = local
        if tp_size > 1:  # TP rank r holds heads [r * local, (r + 1) * local)
            gathered = torch.empty((tp_size * local.shape[0], local.shape[1]), dtype=local.dtype, device=local.device)
            dist.all_gather_into_tensor(gathered, local.contiguous(), group=tp_group)
            heads = gathered.view(tp_size, *local.shape).permute(1, 0, 2).reshape(len(names), -1)
        clipped = heads > tau if tau is not None else torch.zeros_like(heads, dtype=torch.bool)
        return {n: QKClipStats(max_logits=heads[i], clipped=clipped[i]) for i, n in enumerate(names)}

    def reset_max_logits(self) -> None:
        """Forgets the max logits recorded since the last step (e.g. by evaluation forwards); no collective."""
        for _, attn in self.attention_layers:
            attn.core_attention.take_max_attn_logits()

    def newton_schulz_work(self) -> dict[str, float]:
        """Matrices orthogonalised on this rank so far, and this rank's share of the Newton-Schulz FLOPs per step."""
        matrices, mine, total = 0, 0.0, 0.0
        for sub in self.chained_optimizers:
            matrices += sub.matrices_orthogonalized
            if isinstance(sub, MuonClipDistributedOptimizer) and sub.optimizer is not None:
                mine += sub.owned_cost()
                total += sum(sub.ns_load)
        return {"matrices": matrices, "flops_share": mine / total if total else 1.0}


__all__ = ["MuonClipChainedOptimizer", "MuonClipConfig", "MuonClipDistributedOptimizer", "MuonClipFP32Optimizer",
           "MuonClipFloat16Optimizer", "get_muonclip_optimizer"]
