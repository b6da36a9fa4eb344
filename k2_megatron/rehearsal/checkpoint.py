"""A checkpoint save to a dry target: the pretraining checkpoint's sharded state (model chunks, MuonClip state in
megatron's DP-reshardable format, RNG states) through megatron's dist_checkpointing.save, with a sharded strategy
that plans this rank's writes (what it would write, in bytes) and writes nothing.

Not checked here: that every shard is written by exactly one rank (megatron validates it by gathering every rank's
shard metadata, which a single rehearsed rank does not have), and the file system itself.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from k2_megatron.rehearsal import fake_cuda


@dataclasses.dataclass
class CheckpointPlan:
    tensors: int = 0          # shards this rank writes (main replicas)
    bytes: int = 0            # their bytes
    replicas_skipped: int = 0  # shards held here but written by another rank
    objects: int = 0          # pickled objects (RNG states, common state)
    host_tensors: list = dataclasses.field(default_factory=list)  # keys of shards not on the device


class DrySaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save strategy up to the write: records the plan in ``self.plan``."""

    def __init__(self):
        super().__init__("torch_dist", 1)
        self.plan = CheckpointPlan()

    def save(self, sharded_state_dict, checkpoint_dir):
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica

        for item in nested_values(sharded_state_dict):
            if isinstance(item, ShardedTensor):
                if not is_main_replica(item.replica_id):
                    self.plan.replicas_skipped += 1
                    continue
                self.plan.tensors += 1
                self.plan.bytes += item.data.numel() * item.data.element_size()
                if item.data.device.type != "cuda":
                    self.plan.host_tensors.append(item.key)
            elif isinstance(item, ShardedObject):
                self.plan.objects += 1
        if self.plan.tensors:
            fake_cuda._report_sync("device-to-host copy", f"checkpoint: {self.plan.tensors} shards, "
                                   f"{self.plan.bytes / 2**30:.2f} GiB staged to host memory for writing")


def dry_save(model_chunks, optimizer, target: str) -> CheckpointPlan:
    """Runs the pretraining checkpoint's save path for this rank into ``target`` (an empty directory; rank 0 writes
    megatron's small metadata file there) and returns what would be written."""
    from megatron.core import dist_checkpointing

    from k2_megatron.checkpoint.megatron import _sharded_state

    strategy = DrySaveStrategy()
    with torch.no_grad():
        state = _sharded_state(model_chunks, optimizer, is_loading=False, with_rng=True)
        dist_checkpointing.save(state, target, sharded_strategy=strategy, validate_access_integrity=False)
    return strategy.plan
