"""What a torch-DCP checkpoint directory holds, read without trusting it, and what one rank will read from it.

A megatron ``torch_dist`` checkpoint has two kinds of pickles, and unpickling runs whatever callables they name:

- ``.metadata`` (torch DCP's ``Metadata``: every tensor's chunks and which file holds each). torch DCP and
  megatron read it with plain ``pickle.load``. ``read_metadata`` reads it first with an unpickler that admits
  only the classes DCP metadata consists of (ALLOWED_CLASSES, torch dtypes) and refuses anything else without
  calling it;
- pickled objects (``ShardedObject``s: RNG states, layers' ``_extra_state``), which torch DCP loads with
  ``torch.load(weights_only=False)``. ``check_objects`` first loads each object this rank will read with
  ``torch.load(weights_only=True)`` (tensors, containers, numbers, strings only) and refuses the rest.
  (megatron's own common state is already loaded with ``weights_only=True``.)

``read_plan`` lists, for the sharded state dict a rank is about to load, the files it will read, the objects it
will unpickle, and the tensors the checkpoint lacks or holds with another global shape.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass, field

import torch

from k2_megatron.checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError, CheckpointUnsafeError

METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint"
ALLOWED_CLASSES = frozenset({
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.layout's pickle: looks a layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # StorageMeta.checkpoint_id (Python 3.13 moved it)
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    *((f"{_DCP}.filesystem", name) for name in ("_StorageInfo", "_StoragePrefix")),
})


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointUnsafeError(f"{self.path} pickles {module}.{name}, which torch DCP metadata never holds; "
                                    "refusing to unpickle it (the checkpoint may run code when loaded)")


def read_metadata(directory: str):
    """torch DCP's Metadata of ``directory``, unpickled with only ALLOWED_CLASSES admitted."""
    path = os.path.join(directory, METADATA)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, path).load()
    except CheckpointUnsafeError:
        raise
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing") from None
    except Exception as e:  # truncated or garbled pickle
        raise CheckpointCorruptError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def uncovered_tensors(metadata) -> list[str]:
    """Tensors of the checkpoint whose saved chunks do not add up to the whole tensor (a writer's piece missing)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = []
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            if sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size):
                out.append(key)
    return out


@dataclass
class ReadPlan:
    """What loading a sharded state dict reads: files (relative names), pickled objects (fqn -> storage info),
    and the requested tensors the checkpoint does not hold as requested (key -> reason)."""

    files: set[str] = field(default_factory=set)
    objects: dict = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def _overlaps(offsets, sizes, offset, shape) -> bool:
    return all(o < q + s and q < o + n for o, n, q, s in zip(offsets, sizes, offset, shape))


def read_plan(metadata, sharded_state_dict) -> ReadPlan:
    """The files, objects and missing or mismatched tensors of loading ``sharded_state_dict`` from a checkpoint
    with ``metadata`` on this rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    from k2_megatron.megatron.sharding import sharded_rectangles

    plan = ReadPlan()
    storage = metadata.storage_data
    saved = metadata.state_dict_metadata
    for key, global_shape, offset, shape in sharded_rectangles(sharded_state_dict):
        md = saved.get(key)
        if not isinstance(md, TensorStorageMetadata):
            plan.problems[key] = "not in the checkpoint"
            continue
        if tuple(md.size) != tuple(global_shape):
            plan.problems[key] = f"saved with global shape {tuple(md.size)}, requested {tuple(global_shape)}"
            continue
        for chunk in md.chunks:
            if _overlaps(chunk.offsets, chunk.sizes, offset, shape):
                plan.files.add(storage[MetadataIndex(key, chunk.offsets)].relative_path)
    for item in nested_values(sharded_state_dict):
        if isinstance(item, ShardedObject):
            info = storage.get(MetadataIndex(item.unique_key))
            if info is None:
                plan.problems[item.unique_key] = "not in the checkpoint"
                continue
            plan.objects[item.unique_key] = info
            plan.files.add(info.relative_path)
    return plan


def check_objects(directory: str, objects: dict) -> None:
    """Loads each pickled object (fqn -> DCP storage info) with ``torch.load(weights_only=True)``; raises
    CheckpointUnsafeError for one that pickles anything but tensors, containers and plain values."""
    for fqn, info in sorted(objects.items()):
        path = os.path.join(directory, info.relative_path)
        if info.transform_descriptors:
            raise CheckpointUnsafeError(f"{path}: object {fqn} is stored with transforms "
                                        f"{info.transform_descriptors}, which this loader does not check")
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointUnsafeError(f"{path}: object {fqn} pickles more than plain data ({first_line}); refusing "
                                        "to load it (the checkpoint may run code when loaded)") from None
        except Exception as e:
            raise CheckpointCorruptError(f"{path}: object {fqn} is unreadable ({type(e).__name__}: {e})") from None


def describe_problems(directory: str, problems: dict[str, str], limit: int = 3) -> CheckpointMismatchError:
    """One line: the first ``limit`` tensors or objects the checkpoint lacks or holds otherwise, and what to do."""
    from k2_megatron.megatron.optimizer_state import PREFIX

    shown = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:limit])
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    hint = (" The optimizer state saved for these parameters does not fit this run's optimizer (another Muon / "
            "AdamW split?): load the weights only and start the optimizer afresh."
            if all(k.startswith(f"{PREFIX}.") for k in problems) else "")
    return CheckpointMismatchError(f"checkpoint {directory} does not hold what this run loads: {shown}{more}.{hint}")


__all__ = ["ALLOWED_CLASSES", "METADATA", "ReadPlan", "check_objects", "describe_problems", "read_metadata",
           "read_plan", "uncovered_tensors"]
