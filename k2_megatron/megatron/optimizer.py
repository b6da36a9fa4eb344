"""MuonClip on megatron-core models: ZeRO-1 distributed optimizer, TP, EP, PP / virtual stages, global QK-Clip.

    opt = get_muonclip_optimizer(OptimizerConfig(lr=2e-4, bf16=True, use_distributed_optimizer=True), model_chunks)
    ... forward_backward_func(...) ...
    update_successful, grad_norm, _ = opt.step()
    opt.qk_clip_stats  # {layer: (max logit, clipped heads)} of the last step

Structure (K2 report sections 2 and 4): megatron-core builds its usual optimizer (parameter groups with its
weight-decay rules and lr multipliers, one DistributedOptimizer for dense and one for expert parameters under
ZeRO-1, fp32 master weights); the inner torch optimizer of each is replaced by ``k2_megatron.optim.MuonClip``
working on megatron's master weights (flat shards under ZeRO-1):
- Muon for the hidden matrices (``k2_megatron.optim.uses_muon``: 2-D weights and 3-D expert stacks, not the
  embeddings, the output layer or the router), AdamW for the rest.
- Newton-Schulz always sees whole matrices. Under ZeRO-1 (``ShardedOrthogonalizer``) the momentum of each
  gradient bucket is all-gathered over the data-parallel ranks, every matrix is orthogonalised ONCE by the rank
  that owns it (matrices dealt to ranks by Newton-Schulz cost, batched by shape through our kernel), and a
  reduce-scatter hands each rank its shard of the update; momentum stays sharded. A tensor-parallel matrix is
  all-gathered over its TP group before Newton-Schulz and sliced after, so the result equals the unsharded one.
  Expert stacks [E, n, m] count as E matrices (each EP rank its local experts).
- QK-Clip runs inside the inner step on the master weights, before megatron copies them into the bf16 model
  weights, so both copies are clipped. The per-head max logits of every attention layer are all-reduced (MAX)
  over data- and context-parallel ranks in ``MuonClipChainedOptimizer.step``.
- Non-finite gradients and missing or non-finite max logits are detected on every rank and agreed on by all
  ranks before anything is updated (a rank raising alone would leave the others waiting in a collective).
Optimizer state (momentum, Adam moments, step) is saved and loaded with megatron's dist_checkpointing in its
DP-reshardable format (``MuonClipChainedOptimizer.sharded_state_dict``), so a run resumes on another DP size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

from k2_megatron.ops import DEFAULT_COEFFICIENTS
from k2_megatron.optim.muon import MUON_UPDATE_SCALE, muon_orthogonalize
from k2_megatron.optim.muonclip import DEFAULT_ADAMW_PATTERNS, MuonClip, NonFiniteGradientError, uses_muon
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

    def __post_init__(self):
        if self.qk_clip_tau is not None:
            check_qk_clip_args(self.qk_clip_tau, self.qk_clip_alpha)
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"MuonClipConfig: nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")


class _MegatronMuonClip(MuonClip):
    """MuonClip over megatron's master weights: Muon parameters may be flat ZeRO-1 shards, and the shards of
    fp32 parameters are views (non-leaf), as megatron's own inner Adam gets them."""

    # megatron's DP-reshardable checkpoint stores each state key of a gradient bucket as one tensor covering
    # every parameter of the bucket, so all parameters need the same keys: Muon's momentum is kept under
    # "exp_avg", and "exp_avg_sq" is the same tensor (no memory; the checkpoint writes it twice).
    MOMENTUM_KEY = "exp_avg"

    # The step count lives in the param groups, as with TE's FusedAdam: megatron restores it there, while its
    # DP-reshardable loader copies a stale, non-persistent per-parameter "step" over the state (megatron-core
    # 0.19.2, torch-optimizer path). The per-parameter "step" is a fresh copy that megatron's state_dict() reads.
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
            state["exp_avg_sq"] = state["exp_avg"] if use_muon else torch.zeros_like(p)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # megatron matches saved groups to these by lr/wd multipliers only, so a Muon and an AdamW group with the
        # same multipliers look alike to it; which parameters use Muon follows from the model, not the file.
        use_muon = [g["use_muon"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, use_muon):
            group["use_muon"] = flag

    def add_param_group(self, param_group: dict) -> None:
        if "use_muon" not in param_group:
            raise ValueError("MuonClip: every param group needs 'use_muon'")
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        param_group["params"] = list(param_group["params"])
        self.param_groups.append(param_group)


def _pair_param_groups(current_groups: list[dict], state_dict_groups: list[dict]) -> list[dict]:
    """megatron's pairing of saved with current param groups (by lr/wd settings, not position), with
    ``use_muon`` part of a group's identity: megatron's own keys cannot tell a Muon group from an AdamW group
    with the same multipliers, and collapses the two when loading."""

    def identity(group: dict) -> tuple:
        return (bool(group.get("use_muon", False)),
                *(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys))

    saved = {}
    for group in state_dict_groups:
        if identity(group) in saved:
            raise ValueError(f"MuonClip: two saved param groups share the identity {identity(group)}")
        saved[identity(group)] = group
    paired = []
    for current, params in zip(current_groups, [g["params"] for g in state_dict_groups]):
        if identity(current) not in saved:
            raise ValueError(f"MuonClip: no saved param group matches {identity(current)}; saved: {sorted(saved)}")
        group = saved[identity(current)]
        group["params"] = params
        paired.append(group)
    return paired


_MUON_AWARE_CLASSES: dict[type, type] = {}


def _muon_aware(cls: type) -> type:
    """A subclass of megatron's Float16/FP32 optimizer wrapper whose checkpoint loading pairs groups by
    ``_pair_param_groups`` (the distributed optimizer pairs them in its own code, which MuonClip handles)."""
    if cls not in _MUON_AWARE_CLASSES:
        _MUON_AWARE_CLASSES[cls] = type(f"MuonClip{cls.__name__}", (cls,),
                                        {"_filter_and_reorder_param_groups": staticmethod(_pair_param_groups)})
    return _MUON_AWARE_CLASSES[cls]


# ---------------------------------------------------------------------------------------------------------
# Newton-Schulz on whole matrices


@dataclass
class _Matrix:
    """One matrix Muon orthogonalises: a 2-D weight, or expert e of a 3-D stack, as this rank holds it."""

    param: torch.nn.Parameter  # the model parameter
    index: int  # expert index for 3-D stacks, 0 otherwise
    shape: tuple[int, int]  # local (TP-sharded) shape
    partition_dim: int | None  # TP split dimension of the matrix, None if not TP-sharded
    cost: float  # Newton-Schulz FLOPs of the whole matrix (owner balancing)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _matrices_of(param: torch.nn.Parameter, tp_size: int) -> list[_Matrix]:
    shape = tuple(param.shape[-2:])
    pdim = None
    if getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        pdim = param.partition_dim - (param.dim() - 2)  # megatron's partition_dim counts the expert dim
    full = list(shape)
    if pdim is not None:
        full[pdim] *= tp_size
    r, c = min(full), max(full)
    cost = 4.0 * r * r * c + 2.0 * r**3
    count = param.shape[0] if param.dim() == 3 else 1
    return [_Matrix(param, e, shape, pdim, cost) for e in range(count)]


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


class ReplicatedOrthogonalizer:
    """For optimizers whose master weights are whole (TP-local) parameters: Float16/FP32 optimizers."""

    def __init__(self, main_to_model: dict, tp_group):
        self.main_to_model = main_to_model
        self.tp_group = tp_group
        self.matrices_orthogonalized = 0

    def __call__(self, items: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        local, pdims, owners = [], [], []
        for k, (group, main, update) in enumerate(items):
            model = self.main_to_model[main]
            for m in _matrices_of(model, tp_size):
                local.append(update.view(model.shape)[m.index] if model.dim() == 3 else update.view(model.shape))
                pdims.append(m.partition_dim)
                owners.append(k)
        self.matrices_orthogonalized += len(local)
        ortho = _orthogonalize_whole(local, pdims, items[0][0], self.tp_group) if local else []
        out = [torch.empty_like(update) for _, _, update in items]
        position = [0] * len(items)
        for k, o in zip(owners, ortho):
            n = o.numel()
            out[k].view(-1)[position[k]:position[k] + n] = o.reshape(-1)
            position[k] += n
        return out


class ShardedOrthogonalizer:
    """Muon for a megatron DistributedOptimizer (ZeRO-1): per gradient bucket, all-gather the momentum shards
    over the data-parallel group, orthogonalise each matrix once on its owner rank, reduce-scatter the result.

    Owners are dealt by Newton-Schulz cost (largest first, to the least-loaded rank), identically on every rank
    of the data-parallel group and of the TP group, so the TP all-gathers inside the owners' batches pair up.
    """

    def __init__(self, dist_opt: DistributedOptimizer, is_muon, main_to_model: dict, tp_group):
        self.dist_opt = dist_opt
        self.main_to_model = main_to_model
        self.tp_group = tp_group
        self.dp_group = dist_opt.data_parallel_group
        self.dp_size = dist.get_world_size(self.dp_group)
        self.dp_rank = dist.get_rank(self.dp_group)
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        # Per bucket: (buffer index, bucket index, [(matrix, bucket-relative offset, owner)]).
        self.plan = []
        load = [0.0] * self.dp_size
        for gbuf_idx, buffer in enumerate(dist_opt.buffers):
            for bucket_idx, bucket in enumerate(buffer.buckets):
                units = []
                params = sorted((p for p in bucket.params_list if is_muon(p)),
                                key=lambda p: buffer.param_index_map[p][0])
                for p in params:
                    start = buffer.param_index_map[p][0] - bucket.offset
                    for m in _matrices_of(p, tp_size):
                        units.append((m, start + m.index * m.numel))
                # Deal the matrices to DP ranks by cost (deterministic: ties broken by position).
                owners = {}
                for idx in sorted(range(len(units)), key=lambda i: (-units[i][0].cost, i)):
                    owner = min(range(self.dp_size), key=lambda r: (load[r], r))
                    owners[idx] = owner
                    load[owner] += units[idx][0].cost
                if units:
                    self.plan.append((gbuf_idx, bucket_idx, [(m, off, owners[i]) for i, (m, off) in enumerate(units)]))
        self.load = load  # Newton-Schulz FLOPs per DP rank
        self.matrices_orthogonalized = 0  # on this rank, since construction

    def owned_cost(self) -> float:
        return self.load[self.dp_rank]

    def __call__(self, items: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        group = items[0][0] if items else None
        update_of = {self.main_to_model[main]: update for _, main, update in items}
        out_of = {}
        for gbuf_idx, bucket_idx, units in self.plan:
            buffer = self.dist_opt.buffers[gbuf_idx]
            bucket = buffer.buckets[bucket_idx]
            numel = bucket.grad_data.numel()
            shard = numel // self.dp_size
            local = torch.zeros(shard, dtype=torch.float32, device=bucket.grad_data.device)
            ranges = {}
            for p in {m.param for m, _, _ in units}:
                try:
                    rmap = self.dist_opt._get_model_param_range_map(p)
                except KeyError:
                    continue  # no piece of this parameter on this rank
                lo, hi = rmap["gbuf_local"].start, rmap["gbuf_local"].end
                ranges[p] = (lo, hi)
                local[lo:hi] = update_of[p].float() if p in update_of else 0.0
            full = torch.empty(numel, dtype=torch.float32, device=local.device)
            dist.all_gather_into_tensor(full, local, group=self.dp_group)
            result = torch.zeros_like(full)
            mine = [(m, off) for m, off, owner in units if owner == self.dp_rank]
            if group is None:  # no Muon item on this rank: take the settings from any Muon group
                group = next(g for g in self.dist_opt.optimizer.param_groups if g["use_muon"])
            ortho = _orthogonalize_whole([full[off:off + m.numel].view(m.shape) for m, off in mine],
                                         [m.partition_dim for m, _ in mine], group, self.tp_group) if mine else []
            self.matrices_orthogonalized += len(mine)
            for (m, off), o in zip(mine, ortho):
                result[off:off + m.numel] = o.reshape(-1).float()
            local_out = torch.empty_like(local)
            dist.reduce_scatter_tensor(local_out, result, group=self.dp_group)
            for p, (lo, hi) in ranges.items():
                out_of[p] = local_out[lo:hi]
        return [out_of[self.main_to_model[main]].to(update.dtype) for _, main, update in items]


# ---------------------------------------------------------------------------------------------------------
# building


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


def _model_to_shard(sub, main_to_model: dict) -> dict:
    """model parameter -> (inner tensor, first element of the parameter it holds)."""
    out = {}
    for main, model in main_to_model.items():
        start = sub._get_model_param_range_map(model)["param"].start if isinstance(sub, DistributedOptimizer) else 0
        out[model] = (main, start)
    return out


def _attention_layers(model_chunks) -> list[tuple[str, torch.nn.Module]]:
    """(unique name, MLA self-attention module) of every layer in the chunks (global layer numbers)."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    layers = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, MLASelfAttention):
                layers.append((f"layers.{module.layer_number - 1}.self_attention", module))
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
    if getattr(model_chunks[0], "ddp_config", None) is not None and model_chunks[0].ddp_config.use_megatron_fsdp:
        raise ValueError("get_muonclip_optimizer: megatron FSDP is not supported; use ZeRO-1 "
                         "(use_distributed_optimizer=True)")


def get_muonclip_optimizer(config: OptimizerConfig, model_chunks: list,
                           muonclip: MuonClipConfig | None = None) -> "MuonClipChainedOptimizer":
    """megatron-core's optimizer for ``model_chunks`` (DDP-wrapped, as for get_megatron_optimizer) with MuonClip
    as the inner optimizer: ZeRO-1 when ``config.use_distributed_optimizer``, mixed precision per ``config``."""
    muonclip = muonclip or MuonClipConfig()
    model_chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    _check_config(config, model_chunks)
    from megatron.core.optimizer import get_standard_config_overrides

    names = _named_params(model_chunks)

    def is_muon(p, name=None) -> bool:
        return uses_muon(name if name is not None else names.get(p, ""), p, muonclip.adamw_patterns)

    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(with_name_predicate=ParamWithNamePredicate(name="k2_muon", fn=is_muon))] = {"use_muon": True}
    built = get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
    subs = built.chained_optimizers if isinstance(built, ChainedOptimizer) else [built]
    tp_group = parallel_state.get_tensor_model_parallel_group() if parallel_state.model_parallel_is_initialized() \
        else None
    for sub in subs:
        _install(sub, config, muonclip, is_muon, tp_group)
    return MuonClipChainedOptimizer(subs, muonclip, model_chunks)


def _install(sub, config: OptimizerConfig, muonclip: MuonClipConfig, is_muon, tp_group) -> None:
    """Swaps megatron's inner Adam of one sub-optimizer for MuonClip over the same master weights."""
    if getattr(sub, "is_stub_optimizer", False) or sub.optimizer is None:
        return
    groups = sub.optimizer.param_groups
    for g in groups:
        g.setdefault("use_muon", False)
        # megatron's lr scheduler rewrites lr and weight_decay each step with these multipliers; start the same.
        g["lr"] = config.lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = config.weight_decay * g.get("wd_mult", 1.0)
    inner = _MegatronMuonClip(
        groups, lr=config.lr, momentum=muonclip.momentum, nesterov=muonclip.nesterov, weight_decay=config.weight_decay,
        ns_steps=muonclip.ns_steps, ns_coefficients=muonclip.ns_coefficients, ns_eps=muonclip.ns_eps,
        ns_dtype=muonclip.ns_dtype, update_scale=muonclip.update_scale,
        adamw_betas=(config.adam_beta1, config.adam_beta2), adamw_eps=config.adam_eps,
        qk_clip_tau=muonclip.qk_clip_tau, qk_clip_alpha=muonclip.qk_clip_alpha)
    inner.check_finite = False  # MuonClipChainedOptimizer.step agrees on it across all ranks first
    main_to_model = _main_to_model(sub)
    if isinstance(sub, DistributedOptimizer):
        inner.orthogonalize_items = ShardedOrthogonalizer(sub, is_muon, main_to_model, tp_group)
    else:
        inner.orthogonalize_items = ReplicatedOrthogonalizer(main_to_model, tp_group)
        sub.__class__ = _muon_aware(type(sub))
    inner.init_state()
    sub.optimizer = inner
    sub.init_state_fn = lambda opt, config=None: opt.init_state()
    sub.k2_model_to_shard = _model_to_shard(sub, main_to_model)  # for QK-Clip's registration


class MuonClipChainedOptimizer(ChainedOptimizer):
    """megatron-core's ChainedOptimizer of the MuonClip sub-optimizers, plus the global checks and QK-Clip
    bookkeeping that must agree across ranks."""

    def __init__(self, chained_optimizers, muonclip: MuonClipConfig, model_chunks: list):
        super().__init__(chained_optimizers)
        self.muonclip = muonclip
        self.model_chunks = model_chunks
        self.attention_layers = _attention_layers(model_chunks) if muonclip.qk_clip_tau is not None else []
        self.qk_clip_stats: dict[str, tuple[float, int]] = {}
        self.skipped_steps = 0
        for name, attn in self.attention_layers:
            self._register_qk_clip(name, attn)

    def _register_qk_clip(self, name: str, attn) -> None:
        layout = _layout_of(attn)
        w_q, w_kv = _q_up_weight(attn), attn.linear_kv_up_proj.weight
        for sub in self.chained_optimizers:
            inner = sub.optimizer
            if not isinstance(inner, MuonClip):
                continue
            shards = sub.k2_model_to_shard
            if w_q not in shards and w_kv not in shards:
                continue

            def piece(w):
                if w not in shards:
                    return None
                main, start = shards[w]
                return WeightShard(main.view(-1), start, w.shape[0], w.shape[1])

            inner.register_attention(name, w_q_up=piece(w_q), w_kv_up=piece(w_kv), layout=layout)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata: dict | None = None):
        """megatron's, defaulting to the DP-reshardable format (the model-space default of megatron-core 0.19.2
        uses ShardedTensor.flattened_range, which its own dist_checkpointing refuses)."""
        metadata = {"distrib_optim_sharding_type": "dp_reshardable", **(metadata or {})}
        return super().sharded_state_dict(model_sharded_state_dict, is_loading=is_loading, metadata=metadata)

    @torch.no_grad()
    def load_state_dict(self, state_dict) -> None:
        """megatron's, under no_grad: it copies into master weights that are views of fp32 model parameters."""
        super().load_state_dict(state_dict)

    def _agree(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of the flags over all ranks."""
        t = torch.tensor([float(f) for f in flags], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    @torch.no_grad()
    def step(self):
        grads_bad = not all(bool(torch.isfinite(b.grad_data).all()) for chunk in self.model_chunks
                            for b in (*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])))
        logits, missing = self.global_max_logits()
        logits_bad = any(not bool(torch.isfinite(v).all()) for v in logits.values())
        grads_bad, missing_any, logits_bad = self._agree([grads_bad, bool(missing), logits_bad])
        if missing_any:
            raise RuntimeError(f"MuonClip: attention layers recorded no max logits this step (no forward since the "
                               f"last step?): {missing or 'on another rank'}")
        if logits_bad:
            raise ValueError("MuonClip: non-finite max attention logits (the forward overflowed or produced NaN); "
                             f"refusing to clip. This rank: {[n for n, v in logits.items() if not torch.isfinite(v).all()]}")
        if grads_bad:
            if self.muonclip.nonfinite == "raise":
                raise NonFiniteGradientError("MuonClip: non-finite gradients on at least one rank; nothing was updated")
            self.skipped_steps += 1
            self.reset_max_logits()
            return False, None, None
        for sub in self.chained_optimizers:
            inner = sub.optimizer
            if isinstance(inner, MuonClip):
                for name in inner.qk_clip_targets:
                    inner.record_max_logits(name, logits[name])
        result = super().step()
        self.qk_clip_stats = self._layer_stats(logits)
        self.reset_max_logits()
        return result

    def _layer_stats(self, logits: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        """(max logit, clipped heads) of each of this rank's layers, over all its heads (TP ranks combined)."""
        if not logits:
            return {}
        names = list(logits)
        max_logit = torch.stack([logits[n].max() for n in names])
        clipped = torch.stack([(logits[n] > self.muonclip.qk_clip_tau).sum().float() for n in names])
        tp_group = parallel_state.get_tensor_model_parallel_group()
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=tp_group)
        dist.all_reduce(clipped, op=dist.ReduceOp.SUM, group=tp_group)
        return {n: (float(m), int(c)) for n, m, c in zip(names, max_logit.tolist(), clipped.tolist())}

    def global_max_logits(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Per-layer max logits of this rank's layers since the last step, all-reduced (MAX) over data- and
        context-parallel ranks, and the layers that recorded none. A collective: every rank calls it."""
        if not self.attention_layers:
            return {}, []
        values, missing = [], []
        for name, attn in self.attention_layers:
            v = getattr(attn.core_attention, "current_max_attn_logits", None)
            if v is None:
                missing.append(name)
                v = torch.full((attn.num_attention_heads_per_partition,), float("-inf"),
                               device=attn.linear_kv_up_proj.weight.device)
            values.append(v.detach().float())
        flat = torch.cat(values)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
        out, offset = {}, 0
        for (name, _), v in zip(self.attention_layers, values):
            out[name] = flat[offset:offset + v.numel()]
            offset += v.numel()
        return out, missing

    def reset_max_logits(self) -> None:
        """Forgets the recorded max logits (step() does this after using them)."""
        for _, attn in self.attention_layers:
            attn.core_attention.current_max_attn_logits = None

    def newton_schulz_work(self) -> dict[str, float]:
        """Matrices orthogonalised on this rank so far, and this rank's share of the Newton-Schulz FLOPs per step."""
        matrices, mine, total = 0, 0.0, 0.0
        for sub in self.chained_optimizers:
            orth = getattr(sub.optimizer, "orthogonalize_items", None)
            if orth is None:
                continue
            matrices += orth.matrices_orthogonalized
            if isinstance(orth, ShardedOrthogonalizer):
                mine += orth.owned_cost()
                total += sum(orth.load)
        return {"matrices": matrices, "flops_share": mine / total if total else 1.0}


__all__ = ["MuonClipChainedOptimizer", "MuonClipConfig", "ReplicatedOrthogonalizer", "ShardedOrthogonalizer",
           "get_muonclip_optimizer"]
