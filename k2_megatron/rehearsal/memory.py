"""Device memory of a rehearsed rank, measured from the fake allocations: live fake-CUDA storage bytes over time.

Every fake CUDA tensor an operator returns is looked at; a storage not seen before is counted (its bytes, a category)
until Python frees it (a finalizer on the storage object: torch keeps one Python object per storage, so this fires
exactly when the last tensor using it dies, views and ``.data`` swaps included) or resizes it in place
(``untyped_storage().resize_(n)``, seen through an observer of the fake-CUDA patches). That is what
``torch.cuda.memory_allocated()`` counts on a GPU; the caching allocator's reserve and fragmentation come on top.

Categories (``CATEGORIES``):
- parameters: the model's weights and buffers (megatron's contiguous parameter buffers included);
- gradient buffers: megatron DDP's gradient buffers (main_grad);
- optimizer state: fp32 master weights (shards under ZeRO-1), Muon momentum, Adam moments;
these three are assigned by ownership (``assign``) once the model and optimizer exist;
- optimizer temporaries: anything else allocated inside the optimizer step;
- activations: anything else allocated in the forward / backward passes of the micro-batches (what is kept for
  backward, received pipeline inputs included, plus the transients of each operator);
- communication buffers: outputs of collectives other than pipeline receives, allocated in the forward / backward
  passes (all-to-all and all-gather outputs, reduce-scatter outputs); the buffers the optimizer step gathers into
  (Muon's momentum spans) stay optimizer temporaries;
- checkpoint temporaries: allocated while saving a checkpoint (e.g. the optimizer state gathered per bucket);
- other: whatever else lives on the device (e.g. left over from setup).
The step's peak (from ``begin_step``) is reported as the breakdown at the moment the total was highest, and as each
category's own maximum during the step; setup's high-water mark separately.

A storage resized in place (megatron frees activations early with ``untyped_storage().resize_(0)``: the outputs its
CheckpointWithoutOutput recomputes, the tensors its activation offloading releases) counts its new size
(``on_resize``, from the fake-CUDA patch of UntypedStorage.resize_).

Pinned host memory (megatron's activation offloading copies device tensors into it): the bytes of pinned host
buffers that hold a copy of device data, from the device-to-host copy into them until the host-to-device copy out of
them (``on_pinned``, ``pinned_filled``, ``pinned_drained``; micro-batch replay adds what a replayed forward keeps
there with ``hold_pinned``), and its maximum over the step, ``pinned_max``: megatron's offload keeps its host copies in
a pool that grows to the most held at once, so this is the pinned host memory a rank needs for offloaded activations.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch

CATEGORIES = ("parameters", "gradient buffers", "optimizer state", "optimizer temporaries", "activations",
              "communication buffers", "checkpoint temporaries", "other")
CLAIMABLE = ("activations", "other")  # what the outputs of collectives are taken from (claim_transient)


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


@dataclasses.dataclass
class MemoryPeak:
    total: int
    phase: str
    by_category: dict[str, int]


class MemoryTracker:
    def __init__(self):
        self._live: dict[int, list] = {}  # storage key -> [bytes, category, serial]
        self._serial = 0
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = MemoryPeak(0, "", dict(self.current))
        self.category_max = dict(self.current)
        self.phase = ""
        self.allocation_category = "other"
        self.region_max = 0  # high-water mark since it was last set (micro-batch replay resets it)
        self.setup_peak = 0   # high-water mark before begin_step (model and optimizer construction)
        self._watched = None
        self._pinned: dict[int, list] = {}  # pinned host storage key -> [bytes, serial, holding device data]
        self.pinned = 0       # bytes of pinned host buffers holding device data now
        self.pinned_max = 0   # their maximum since begin_step

    # ----- counting -----

    def watch(self) -> dict:
        """Starts recording the storages allocated from now on; returns {(storage key, serial): bytes}, filled
        until ``unwatch()``. ``is_live(entry)`` tells whether one is still alive (a storage's key is its address,
        which a later allocation may reuse: the serial tells them apart)."""
        self._watched = {}
        return self._watched

    def unwatch(self) -> None:
        self._watched = None

    def is_live(self, entry: tuple[int, int]) -> bool:
        live = self._live.get(entry[0])
        return live is not None and live[2] == entry[1]

    def live(self, entry: tuple[int, int]) -> tuple[int, str] | None:
        """(bytes now, category) of a live storage (``watch``'s entry), None once it is freed."""
        live = self._live.get(entry[0])
        return (live[0], live[1]) if live is not None and live[2] == entry[1] else None

    def live_bytes(self, watched: dict) -> int:
        """The bytes now held by the still-live storages of ``watched`` (a ``watch()`` record; a storage resized
        since, e.g. a recomputed output freed with resize_(0), counts what it holds now)."""
        return sum(live[0] for live in map(self.live, watched) if live is not None)

    def entry_of(self, t: torch.Tensor) -> tuple[int, int]:
        """(storage key, serial) of a counted device tensor's storage."""
        key = storage_key(t)
        return key, self._live[key][2]

    def _add(self, storage, category: str) -> None:
        key = storage._cdata
        n = storage.nbytes()
        self._serial += 1
        if self._watched is not None:
            self._watched[(key, self._serial)] = n
        self._live[key] = [n, category, self._serial]
        weakref.finalize(storage, self._free, key, self._serial)
        self.current[category] += n
        self.total += n
        self._note_peaks(category)

    def _note_peaks(self, category: str) -> None:
        if self.current[category] > self.category_max[category]:
            self.category_max[category] = self.current[category]
        if self.total > self.region_max:
            self.region_max = self.total
        if self.total > self.peak.total:
            self.peak = MemoryPeak(self.total, self.phase, dict(self.current))

    def transient(self, nbytes: int) -> None:
        """Counts ``nbytes`` allocated and freed at once in the current allocation category: an operator's
        internal workspace, which its fake implementation does not allocate (only the peaks see it)."""
        category = self.allocation_category
        self.current[category] += nbytes
        self.total += nbytes
        self._note_peaks(category)
        self.current[category] -= nbytes
        self.total -= nbytes

    def _free(self, key: int, serial: int) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[2] == serial:
            del self._live[key]
            self.current[entry[1]] -= entry[0]
            self.total -= entry[0]

    # ----- pinned host memory -----

    def on_pinned(self, t: torch.Tensor) -> None:
        """A pinned host tensor was allocated (holding nothing yet)."""
        storage = t.untyped_storage()
        self._serial += 1
        self._pinned[storage._cdata] = [storage.nbytes(), self._serial, False]
        weakref.finalize(storage, self._free_pinned, storage._cdata, self._serial)

    def is_pinned(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and storage_key(t) in self._pinned

    def pinned_filled(self, t: torch.Tensor) -> None:
        """Device data was copied into pinned host tensor ``t``."""
        entry = self._pinned[storage_key(t)]
        if not entry[2]:
            entry[2] = True
            self.hold_pinned(entry[0])

    def pinned_drained(self, t: torch.Tensor) -> None:
        """Pinned host tensor ``t`` was copied back to the device: its buffer is free for reuse."""
        entry = self._pinned[storage_key(t)]
        if entry[2]:
            entry[2] = False
            self.hold_pinned(-entry[0])

    def hold_pinned(self, nbytes: int) -> None:
        self.pinned += nbytes
        self.pinned_max = max(self.pinned_max, self.pinned)

    def _free_pinned(self, key: int, serial: int) -> None:
        entry = self._pinned.get(key)
        if entry is not None and entry[1] == serial:
            del self._pinned[key]
            if entry[2]:
                self.pinned -= entry[0]

    def on_tensor(self, t: torch.Tensor, category: str | None = None) -> None:
        """Counts the storage of a device tensor if it is new."""
        if t.device.type != "cuda":
            return
        storage = t.untyped_storage()
        if storage._cdata not in self._live:
            self._add(storage, category or self.allocation_category)

    def on_resize(self, storage) -> None:
        """A device storage resized in place: ``untyped_storage().resize_(0)`` is how megatron frees a recomputed output
        (CheckpointWithoutOutput), the all-to-all buffers of its combined 1F1B schedule and offloaded activations, the
        tensor object living on; resizing back re-allocates, in the storage's category."""
        entry = self._live.get(storage._cdata)
        if entry is None:  # not a counted device storage (a fake tensor's storage is on "meta", host or device)
            return
        delta = storage.nbytes() - entry[0]
        entry[0] += delta
        self.current[entry[1]] += delta
        self.total += delta
        if delta > 0:
            self._note_peaks(entry[1])

    def on_outputs(self, out) -> None:
        if isinstance(out, torch.Tensor):
            self.on_tensor(out)
        elif isinstance(out, (list, tuple)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    self.on_tensor(o)

    def assign(self, tensors, category: str) -> None:
        """Moves the storages of ``tensors`` (device tensors) to ``category`` (counting any not seen yet)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
                continue
            storage = t.untyped_storage()
            entry = self._live.get(storage._cdata)
            if entry is None:
                self._add(storage, category)
            elif entry[1] != category:
                self.current[entry[1]] -= entry[0]
                self.current[category] += entry[0]
                entry[1] = category
                self.category_max[category] = max(self.category_max[category], self.current[category])

    def claim_transient(self, tensors, category: str) -> None:
        """Moves storages to ``category`` if they were counted as activations or other (used for the outputs of
        collectives): the persistent categories keep theirs, and so do the optimizer step's and the checkpoint's
        own temporaries (Muon's gather buffers are optimizer temporaries, as the planner counts them)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                entry = self._live.get(storage_key(t))
                if entry is not None and entry[1] in CLAIMABLE:
                    self.assign([t], category)

    def begin_step(self) -> None:
        """Starts counting the step's peaks (setup's own high-water mark is kept in ``setup_peak``)."""
        self.setup_peak = self.peak.total
        self.peak = MemoryPeak(self.total, self.phase, dict(self.current))
        self.category_max = dict(self.current)
        self.pinned_max = self.pinned

    def stats(self) -> dict:
        """torch.cuda.memory_stats()-style answers (what the fake-CUDA patches return for memory_allocated etc.)."""
        return {"allocated_bytes.all.current": self.total, "allocated_bytes.all.peak": self.peak.total}
