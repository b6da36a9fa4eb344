"""A ParallelLayout (k2_megatron.config.parallel) in megatron-core's terms: initialise its parallel_state from a
layout, read the layout back from the initialised parallel_state or from a TransformerConfig, and the device the
collectives of its process groups run on."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from k2_megatron.config.parallel import ParallelLayout


def initialize_model_parallel(layout: ParallelLayout, *, timeout_minutes: int | None = None) -> None:
    """megatron's parallel_state for ``layout`` (the default process group must exist; DP is what is left).
    ``timeout_minutes``: the timeout of its process groups (None: megatron-core's default, 30)."""
    timeout = {} if timeout_minutes is None else {"distributed_timeout_minutes": timeout_minutes}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel, pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_stages,
        expert_model_parallel_size=layout.expert_parallel, expert_tensor_parallel_size=layout.expert_tensor_parallel,
        context_parallel_size=layout.context_parallel, **timeout)


def initialized_layout(*, first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                       pipeline_layout: str | None = None) -> ParallelLayout:
    """The layout of the initialised parallel_state, with the given split of the layers over its stages."""
    return ParallelLayout(
        tensor_parallel=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_parallel=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_stages=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        expert_parallel=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel=parallel_state.get_expert_tensor_parallel_world_size(),
        context_parallel=parallel_state.get_context_parallel_world_size(),
        data_parallel=parallel_state.get_data_parallel_world_size(),
        first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers, pipeline_layout=pipeline_layout)


def transformer_config_layout(config: TransformerConfig) -> ParallelLayout:
    """The layout a TransformerConfig was made for (its pipeline layout back as megatron's string)."""
    layout = config.pipeline_model_parallel_layout
    if layout is not None and not isinstance(layout, str):  # TransformerConfig.__post_init__ parsed it
        layout = layout.input_data
    return ParallelLayout(
        tensor_parallel=config.tensor_model_parallel_size, pipeline_parallel=config.pipeline_model_parallel_size,
        virtual_pipeline_stages=config.virtual_pipeline_model_parallel_size,
        expert_parallel=config.expert_model_parallel_size,
        expert_tensor_parallel=config.expert_tensor_parallel_size or 1,
        context_parallel=config.context_parallel_size, first_stage_layers=config.num_layers_in_first_pipeline_stage,
        last_stage_layers=config.num_layers_in_last_pipeline_stage, pipeline_layout=layout)


def collective_device(group=None) -> torch.device:
    """Where tensors of a collective on ``group`` live: the current CUDA device under NCCL (which refuses CPU
    tensors), else the CPU (gloo)."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_on_backend(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``dist.all_reduce`` of ``tensor`` over ``group`` on the device of the group's backend, returned there: in
    place when ``tensor`` already lives there, else on a copy (a host tensor under NCCL). The one way the training
    loop and the optimizer reduce values they made themselves (counts, losses, flags)."""
    on_backend = tensor.to(collective_device(group))
    dist.all_reduce(on_backend, op=op, group=group)
    return on_backend


def set_on_any_rank(*flags: bool) -> list[bool]:
    """Collective over the world (one all-reduce, one host read): each flag, set on any rank. Every rank takes the
    same branch on the result."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = all_reduce_on_backend(torch.tensor([1.0 if f else 0.0 for f in flags]), op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
