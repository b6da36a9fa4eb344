"""The MoE routing the rehearsal declares: fake tensors carry no values, so the router's choices are unknown, yet the
all-to-all needs its split sizes on the host (megatron copies the token counts to the host before the exchange).

``Routing()`` is balanced: every expert receives the same number of token copies (tokens x top-k / experts, the
remainder spread one by one over the first experts). ``Routing(skew=s)`` makes each expert local to the rehearsed rank
receive s times the balanced load, the other experts sharing the rest evenly: the rank whose experts are hottest,
i.e. its worst case for the memory of dispatched tokens. Every rank is taken to route the same way, so what this
rank receives from each expert-parallel peer equals what it sends to its own experts.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DispatchCounts:
    """Host values of megatron's MoEAlltoAllTokenDispatcher after its device-to-host copy, for one MoE layer call."""

    input_splits: np.ndarray                     # [ep] token copies this rank sends to each EP rank
    output_splits: np.ndarray                    # [ep] token copies it receives from each EP rank
    output_splits_tp: np.ndarray                 # [tp] received from each TP rank (after the EP exchange)
    global_tokens_per_local_expert: np.ndarray   # [tp * ep, local experts] received, by source rank and expert
    tokens_per_local_expert: np.ndarray          # [local experts] rows each local expert computes


@dataclasses.dataclass(frozen=True)
class Routing:
    """skew: load of each of the rehearsed rank's local experts relative to the balanced load (1 = balanced)."""

    skew: float = 1.0

    def __post_init__(self):
        if not isinstance(self.skew, (int, float)) or not np.isfinite(self.skew) or self.skew < 1:
            raise ValueError(f"Routing: skew must be a finite number >= 1 (1 = balanced), got {self.skew!r}")

    @classmethod
    def parse(cls, text: str) -> "Routing":
        """"balanced" or "skewed:<s>" (command-line form)."""
        if text == "balanced":
            return cls()
        kind, _, value = text.partition(":")
        if kind == "skewed":
            try:
                return cls(float(value))
            except ValueError:
                pass
        raise ValueError(f"routing {text!r}: expected 'balanced' or 'skewed:<s>' with s >= 1, e.g. 'skewed:4'")

    def describe(self) -> str:
        return "balanced" if self.skew == 1 else f"skewed: this rank's experts get {self.skew:g}x the balanced load"

    def expert_loads(self, tokens: int, topk: int, num_experts: int, local_experts: range) -> np.ndarray:
        """Token copies per expert sent by one rank of ``tokens`` tokens: sums to tokens x topk, at most ``tokens``
        each (a token picks an expert once)."""
        n_local = len(local_experts)
        if self.skew * n_local > num_experts:
            raise ValueError(f"Routing: skew {self.skew:g} on {n_local} local experts exceeds all {num_experts} "
                             f"experts' load (skew x local experts must be <= experts)")
        if self.skew * topk > num_experts:
            raise ValueError(f"Routing: skew {self.skew:g} would send an expert more copies than there are tokens "
                             f"(skew x top-k = {self.skew * topk:g} > {num_experts} experts)")
        share = np.empty(num_experts)
        share[:] = (1.0 - self.skew * n_local / num_experts) / max(num_experts - n_local, 1)
        share[local_experts.start:local_experts.stop] = self.skew / num_experts
        exact = share * tokens * topk
        loads = np.floor(exact).astype(np.int64)
        remainder = tokens * topk - int(loads.sum())
        order = np.lexsort((np.arange(num_experts), -(exact - loads)))  # largest fractional parts first
        loads[order[:remainder]] += 1
        return loads

    def dispatch_counts(self, dispatcher) -> DispatchCounts:
        """The counts megatron's all-to-all dispatcher (``MoEAlltoAllTokenDispatcher``) would read back."""
        tokens = int(dispatcher.routing_map.shape[0])
        topk = int(dispatcher.config.moe_router_topk)
        ep, tp, n_local = dispatcher.ep_size, dispatcher.tp_size, dispatcher.num_local_experts
        first = dispatcher.local_expert_indices[0]
        loads = self.expert_loads(tokens, topk, dispatcher.num_experts, range(first, first + n_local))
        input_splits = loads.reshape(ep, n_local).sum(axis=1)
        mine = loads[first:first + n_local]
        per_source = np.tile(mine, (tp * ep, 1))
        output_splits = np.full(ep, int(mine.sum()), dtype=np.int64)
        output_splits_tp = np.full(tp, int(mine.sum()) * ep, dtype=np.int64)
        return DispatchCounts(input_splits, output_splits, output_splits_tp, per_source, per_source.sum(axis=0))
