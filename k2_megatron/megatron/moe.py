"""K2 MoE pieces for megatron-core's MoELayer: grouped-GEMM SwiGLU experts and the K2 router.

K2GroupedMLP is an ``MoESubmodules.experts`` builder target: MoELayer builds it as
experts(num_local_experts, config, pg_collection=..., name=...) and calls
forward(dispatched_input, tokens_per_expert, permuted_probs) -> (out, None), where megatron's token
dispatcher has already permuted the tokens by local expert (rows of expert 0 first) and will un-permute
and sum the k weighted copies. Both expert matmuls are ``k2_megatron.ops.grouped_gemm``:

    h_e = silu(x W_gate,e^T) * (x W_up,e^T);   y_e = (p * h_e) W_down,e^T

with the routing weight p applied before the down projection (megatron's convention; linear, so equal to
applying it to y_e). Weights keep the Hugging Face / nn.Linear orientation [out, in] per expert:
linear_fc1_weight [E_local, 2F, H] = [gate; up], linear_fc2_weight [E_local, H, F].

Delayed weight gradients (``config.delay_wgrad_compute``, with megatron's ``overlap_moe_expert_parallel_comm``):
the backward pass computes only the input gradients and keeps (input, output gradient) of both GEMMs;
``backward_dw()``, which megatron's combined 1F1B schedule calls after the layer's MLP backward (while the other
micro-batch's dispatch all-to-all is in flight), computes dW = grouped_gemm_wgrad(...) and hands each weight's
gradient to megatron's DDP through the hooks registered with ``register_wgrad_accumulation_and_reduce_hooks`` (DDP
registers them instead of its autograd hooks for parameters marked ``skip_backward_post_hook`` when its own
``delay_wgrad_compute`` is on).

K2MoELayer is megatron's MoELayer whose all-to-all dispatcher (K2AlltoAllTokenDispatcher) does the local
permutation (tokens -> rows grouped by expert, before the EP all-to-all) and its inverse with
``k2_megatron.ops.permute`` / ``unpermute``; the all-to-all, the split bookkeeping and the per-local-expert
regrouping stay megatron's. Megatron's own permutation orders rows by expert, then by token; ours orders
them by expert, then by t*k + j, which is the same order (a token meets an expert at most once), so the
split sizes megatron computes from the routing map describe our rows.

K2Router is megatron's TopKRouter restricted to K2's routing (sigmoid scores, aux-loss-free expert bias
used for selection only, top-k weights normalised and times routed_scaling_factor); the bias update rule
(sign rule with a configurable rate, or frozen) is chosen by ``K2Router.bias_update_rate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.pipeline_parallel.fine_grained_activation_offload import (
    FineGrainedActivationOffloadingInterface as off_interface,
)
from megatron.core.tensor_parallel.random import (
    CheckpointWithoutOutput,
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from k2_megatron import ops  # looked up per call: ops.<name> is whatever k2_megatron.ops exports then
from k2_megatron.megatron.activation_memory import fp8_saved_tensors, swiglu_recompute_enabled


class K2GroupedMLP(MegatronModule):
    """The local routed experts of one MoE layer, run as two grouped GEMMs (SwiGLU in between)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, name: str | None = None,
                 **unused):
        super().__init__(config=config)
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.ep_group = pg_collection.ep
        self.expt_dp_group = pg_collection.expt_dp
        etp = pg_collection.expt_tp.size() if pg_collection.expt_tp is not None else 1
        if etp != 1:
            raise ValueError(f"K2GroupedMLP: expert_tensor_parallel_size must be 1, got {etp}")
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("K2GroupedMLP: the experts are SwiGLU (gated_linear_unit=True, activation_func=F.silu)")
        if config.add_bias_linear:
            raise ValueError("K2GroupedMLP: expert linears have no bias (add_bias_linear=False)")
        if config.moe_apply_probs_on_input:
            raise ValueError("K2GroupedMLP: moe_apply_probs_on_input is not supported")
        self.num_local_experts = num_local_experts
        self.fp8_activation_storage = False  # FP8 copies of the saved fc1 / SwiGLU inputs (apply_activation_memory)
        # megatron's fine-grained activation offloading of the fc1 input and of the SwiGLU input (offload_modules)
        offloaded = set(config.offload_modules or ()) if config.fine_grained_activation_offloading else set()
        self.offload_expert_fc1 = "expert_fc1" in offloaded
        self.offload_moe_act = "moe_act" in offloaded
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        self.ffn_hidden_size = ffn
        dtype = config.params_dtype
        on_cpu = config.use_cpu_initialization or not torch.cuda.is_available()
        device = "cpu" if on_cpu else torch.cuda.current_device()
        self.linear_fc1_weight = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, hidden, dtype=dtype,
                                                                device=device))
        self.linear_fc2_weight = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, dtype=dtype,
                                                                device=device))
        self.delay_wgrad = bool(config.delay_wgrad_compute)
        self._pending_wgrad: list[tuple] = []  # (weight, input, output gradient, batch sizes) until backward_dw
        self._wgrad_hooks: list = []  # megatron DDP's gradient accumulation/reduce hooks (delayed wgrad)
        for p in (self.linear_fc1_weight, self.linear_fc2_weight):
            # Expert parameters: gradients are reduced over the expert-data-parallel group, not all DP ranks.
            p.allreduce = False
            # with delayed wgrad, DDP hooks backward_dw instead of the weights' gradient accumulation
            p.skip_backward_post_hook = self.delay_wgrad
        if config.perform_initialization:
            self._initialize()

    def _initialize(self) -> None:
        tracker = get_cuda_rng_tracker()
        fork = (tracker.fork(get_expert_parallel_rng_tracker_name())
                if tracker.is_initialized() and get_expert_parallel_rng_tracker_name() in tracker.get_states()
                else torch.random.fork_rng(devices=[]))
        with fork, torch.no_grad():
            for e in range(self.num_local_experts):
                self.config.init_method(self.linear_fc1_weight[e])
                self.config.output_layer_init_method(self.linear_fc2_weight[e])

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        # megatron hands the counts on the host (a tensor or numpy array) after its device-to-host copy;
        # grouped_gemm takes int64 counts on the host or on x's device.
        batch_sizes = torch.as_tensor(tokens_per_expert, dtype=torch.int64)
        if batch_sizes.numel() != self.num_local_experts:
            raise ValueError(f"K2GroupedMLP: tokens_per_expert has {batch_sizes.numel()} entries, expected "
                             f"{self.num_local_experts} (local experts)")
        if self._pending_wgrad and torch.is_grad_enabled():
            raise RuntimeError("K2GroupedMLP: delay_wgrad_compute is on and the weight gradients of the last backward "
                               "are still pending: call backward_dw() after each backward (megatron's combined 1F1B "
                               "schedule does, with overlap_moe_expert_parallel_comm)")
        # FP8 storage, SwiGLU recomputation and CPU offload change what is kept for backward, never the outputs.
        # Offload (megatron's groups "expert_fc1" and "moe_act", as its TEGroupedMLP): what a group's block saves
        # (FP8 tiles and scales when fp8 is on: fp8_saved_tensors passes them through the offload hooks) is copied
        # to pinned host memory when the group commits, and reloaded when backward reaches the commit.
        fp8 = self.fp8_activation_storage
        fc1_offload = off_interface(self.offload_expert_fc1, x, "expert_fc1")
        with fc1_offload as x, fp8_saved_tensors(x, enabled=fp8):
            h = self._expert_gemm(x, self.linear_fc1_weight, batch_sizes)
        h = fc1_offload.group_offload(h, forced_released_tensors=[x])  # x is not needed on the device any more
        act_offload = off_interface(self.offload_moe_act, h, "moe_act")
        if swiglu_recompute_enabled(self.config) and torch.is_grad_enabled():
            ckpt = CheckpointWithoutOutput(fp8=None)
            with act_offload as h, fp8_saved_tensors(h, enabled=fp8):  # the checkpoint keeps only h and probs
                a = ckpt.checkpoint(_weighted_swiglu, h, permuted_probs)
            if fp8:
                # autograd's record of the checkpoint's input (a detached leaf, through its gradient accumulator)
                # would keep h's bf16 storage alive beside the FP8 copy; nothing reads it again (fc1's backward
                # needs its input, the recomputation the FP8 copy)
                h.untyped_storage().resize_(0)
            out = self._expert_gemm(a, self.linear_fc2_weight, batch_sizes)
            ckpt.discard_output_and_register_recompute(out)  # a is freed; recomputed before fc2's backward
        else:
            with act_offload as h, fp8_saved_tensors(h, enabled=fp8):
                a = _weighted_swiglu(h, permuted_probs)
            out = self._expert_gemm(a, self.linear_fc2_weight, batch_sizes)
        # The moe_act group commits on fc2's output, not on a: its backward (which waits for the reload of h) then
        # runs before fc2's, whose hook recomputes SwiGLU from h.
        return act_offload.group_offload(out, forced_released_tensors=[h]), None

    def _expert_gemm(self, x: torch.Tensor, weight: torch.Tensor, batch_sizes: torch.Tensor) -> torch.Tensor:
        """x_e W_e^T per local expert; with delayed wgrad the backward leaves W's gradient to backward_dw."""
        if self.delay_wgrad and torch.is_grad_enabled() and weight.requires_grad:
            return _DelayedWgradGroupedLinear.apply(x, weight, batch_sizes, self._pending_wgrad)
        return ops.grouped_gemm(x, weight, batch_sizes, trans_b=True)

    def register_wgrad_accumulation_and_reduce_hooks(self, hook) -> None:
        """megatron DDP (delay_wgrad_compute): ``hook()`` moves one weight's .grad into its gradient buffer (and
        starts its reduction). DDP registers one per weight, in the order of the module's parameters."""
        self._wgrad_hooks.append(hook)

    def backward_dw(self) -> None:
        """The weight gradients the last backward left pending (delay_wgrad_compute), one weight at a time: its
        gradient is accumulated into its .grad and handed to megatron's DDP hook (which adds it to the gradient buffer
        and frees it) before the next weight's is computed, and each (input, output gradient) pair is dropped once
        used, so the backward never holds two expert weight gradients (K2 at EP16: 1.3 GiB for fc1, 0.7 GiB for fc2
        per layer). A no-op without delayed wgrad."""
        if not self._pending_wgrad:
            return
        if not self._wgrad_hooks and any(hasattr(w, "main_grad") for w, *_ in self._pending_wgrad):
            raise RuntimeError("K2GroupedMLP: TransformerConfig.delay_wgrad_compute is on, but megatron's "
                               "DistributedDataParallel was built with DistributedDataParallelConfig("
                               "delay_wgrad_compute=False): it would never see the experts' weight gradients")
        pending = list(self._pending_wgrad)
        self._pending_wgrad.clear()  # the same list object: in-flight backward passes append to it
        hooks = self._hooks_by_weight()
        while pending:
            weight, x, dy, batch_sizes = pending.pop(0)
            dw = ops.grouped_gemm_wgrad(x, dy, batch_sizes, trans_b=True)
            del x, dy
            weight.grad = dw if weight.grad is None else weight.grad.add_(dw)
            del dw
            if all(w is not weight for w, *_ in pending):  # its last pending gradient: hand it to DDP
                for hook in hooks.pop(id(weight), ()):
                    hook()
        for rest in hooks.values():  # weights without a pending gradient: DDP's hook decides (as autograd's would)
            for hook in rest:
                hook()

    def _hooks_by_weight(self) -> dict:
        """{id(weight): [its DDP hooks]}: megatron DDP registers one hook per weight in the module's parameter order
        (each DDP wrapping the module registers its own set)."""
        weights = list(self.parameters())
        if len(self._wgrad_hooks) % len(weights):
            raise RuntimeError(f"K2GroupedMLP: {len(self._wgrad_hooks)} weight-gradient hooks registered for "
                               f"{len(weights)} weights; megatron DDP registers one per weight")
        out = {}
        for i, hook in enumerate(self._wgrad_hooks):
            out.setdefault(id(weights[i % len(weights)]), []).append(hook)
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Both weights sharded along the expert dim (local experts = a contiguous slice of the global ones)."""
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        dp_rank = self.expt_dp_group.rank() if self.expt_dp_group is not None else 0
        out = {}
        for name, param in self.named_parameters(recurse=False):
            key = f"{prefix}{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key, param, *sharded_offsets, (len(sharded_offsets), ep_rank, ep_size),
                replica_id=(0, 0, dp_rank), prepend_axis_num=len(sharded_offsets))
        return out


class _DelayedWgradGroupedLinear(torch.autograd.Function):
    """y = grouped_gemm(x, W, trans_b=True) whose backward returns dx only and queues (W, x, dy, batch_sizes) for
    K2GroupedMLP.backward_dw. x and W are saved through the enclosing saved-tensor hooks (FP8 storage); the queue
    names the parameter itself (what comes back from saved-tensor hooks is another tensor object)."""

    @staticmethod
    def forward(ctx, x, weight, batch_sizes, pending):
        ctx.save_for_backward(x, weight)
        ctx.parameter, ctx.batch_sizes, ctx.pending = weight, batch_sizes, pending
        return ops.grouped_gemm(x, weight, batch_sizes, trans_b=True)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = ops.grouped_gemm(dy, weight, ctx.batch_sizes, trans_b=False) if ctx.needs_input_grad[0] else None
        ctx.pending.append((ctx.parameter, x, dy, ctx.batch_sizes))
        return dx, None, None, None


def _weighted_swiglu(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """p * silu(gate) * up of fc1's output h = [gate | up] (the formula above), in h's dtype."""
    gate, up = torch.chunk(h, 2, dim=-1)
    return (F.silu(gate) * up * probs.unsqueeze(-1)).to(h.dtype)


class K2Router(TopKRouter):
    """TopKRouter checked to route as K2 does.

    Selection: top-k of sigmoid(logits) + expert_bias (fp32 buffer, HF ``e_score_correction_bias``);
    weights: the selected sigmoid scores, divided by their sum, times routed_scaling_factor.
    Bias update (megatron's finalize_model_grads, once per global batch): expert_bias += rate *
    sign(mean load - load of the expert) with rate = config.moe_router_bias_update_rate; ``freeze_bias()``
    stops updates (e.g. for evaluation or a frozen-router fine-tune).
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, is_mtp_layer: bool = False, **unused):
        problems = []
        if config.moe_router_score_function != "sigmoid":
            problems.append(f"moe_router_score_function={config.moe_router_score_function!r} (need 'sigmoid')")
        if not config.moe_router_enable_expert_bias:
            problems.append("moe_router_enable_expert_bias=False (need True)")
        if config.moe_router_pre_softmax:
            problems.append("moe_router_pre_softmax=True (need False)")
        if config.moe_router_load_balancing_type not in ("none", "seq_aux_loss", "aux_loss"):
            problems.append(f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r}")
        if config.moe_expert_capacity_factor is not None:
            problems.append("moe_expert_capacity_factor is set (K2 drops no tokens)")
        if problems:
            raise ValueError("K2Router: config does not describe K2 routing: " + "; ".join(problems))
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)

    @property
    def bias_update_rate(self) -> float:
        return 0.0 if self.frozen_expert_bias else float(self.config.moe_router_bias_update_rate)

    def freeze_bias(self, frozen: bool = True) -> None:
        self.frozen_expert_bias = frozen


class K2AlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher with the first permutation and its inverse done by our ops.

    Falls back to megatron's permutation for the features our ops do not cover (token dropping/padding,
    quantisation padding, TE-fused permutation)."""

    def _ours(self) -> bool:
        return not (self.drop_and_pad or self.config.moe_router_padding_for_quantization
                    or self.config.moe_permute_fusion)

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        if not self._ours():
            self._k2_row_map = None
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        # Same bookkeeping as megatron's dispatch_preprocess (split sizes from the routing map).
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        if probs.dim() != 2 or routing_map.dim() != 2 or routing_map.dtype != torch.bool:
            raise ValueError(f"K2AlltoAllTokenDispatcher: expected 2-D probs and a 2-D bool routing_map, got "
                             f"{tuple(probs.shape)} and {tuple(routing_map.shape)} {routing_map.dtype}")
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(self.routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        # Every token has exactly k chosen experts (no dropping): their ids, without a host synchronisation.
        topk_indices = torch.topk(routing_map.to(torch.int8), self.config.moe_router_topk, dim=1).indices
        permuted, row_map, _ = ops.permute(hidden_states, topk_indices, self.config.num_moe_experts,
                                           check_indices=False)
        topk_probs = probs.gather(1, topk_indices)
        permuted_probs = torch.zeros(row_map.numel(), dtype=probs.dtype, device=probs.device).scatter(
            0, row_map.reshape(-1), topk_probs.reshape(-1))
        self._k2_row_map = row_map
        return permuted, permuted_probs

    def combine_postprocess(self, permutated_local_input_tokens: torch.Tensor):
        if self._k2_row_map is None:
            return super().combine_postprocess(permutated_local_input_tokens)
        # The routing weights were applied inside the experts: the k copies of a token are summed.
        output = ops.unpermute(permutated_local_input_tokens, self._k2_row_map, None)
        self._k2_row_map = None
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output


class K2MoELayer(MoELayer):
    """megatron's MoELayer; with the all-to-all dispatcher, ours (permutation by k2_megatron.ops)."""

    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int | None = None,
                 pg_collection=None, is_mtp_layer: bool = False, name: str | None = None):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)
        if config.moe_token_dispatcher_type == "alltoall" and config.transformer_impl != "inference_optimized":
            self.token_dispatcher = K2AlltoAllTokenDispatcher(self.num_local_experts, self.local_expert_indices,
                                                              config=self.config, pg_collection=pg_collection)
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
