"""How a K2 run is split over ranks: one ``ParallelLayout`` value and all of its maths.

As torchtitan's ParallelDims: the size of every parallel dimension in one frozen value that checks itself,
derives the data-parallel size from the world size (``for_world``) and says which decoder layers each pipeline
stage holds. Sizes follow megatron-core: world = TP x CP x PP x DP; the experts are split over EP ranks taken
inside DP x CP x TP (expert TP = 1 for K2), so the expert data-parallel size is world / (PP x EP).

Layers go to PP x V model chunks (V virtual stages; chunk c is virtual stage c // PP of pipeline stage c % PP,
the order in which megatron numbers layers):
- evenly (num_layers divisible by PP x V);
- with ``first_stage_layers`` / ``last_stage_layers`` (megatron's num_layers_in_{first,last}_pipeline_stage): the
  first and/or last stage take that many, the middle stages split the rest evenly, each stage's count divisible
  by V (61 layers over 16 stages: first 3, last 2);
- per chunk with ``pipeline_layout``: "auto" (``balanced_chunk_layers``) or megatron-core's layout string
  (TransformerConfig.pipeline_model_parallel_layout, read with megatron-core's own parser): 61 layers over 16
  stages x 2 virtual stages need it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k2_megatron.config.model import K2Config

_SIZES = ("tensor_parallel", "pipeline_parallel", "expert_parallel", "expert_tensor_parallel", "context_parallel")


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of a run and its split of the decoder layers over pipeline stages.

    data_parallel: None until known; ``for_world(world_size)`` derives it. labels: how messages about these values
    name each field (a run config passes its YAML keys, e.g. {"tensor_parallel": "parallel.tensor"}); messages
    relating the layout to a model (``check_model``, ``chunk_layers``) use the field names, as megatron does.
    """

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_stages: int | None = None   # interleaved 1F1B when > 1
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    context_parallel: int = 1
    data_parallel: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    pipeline_layout: str | None = None
    labels: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name in _SIZES:
            _check_size(self._label(name), getattr(self, name))
        for name in ("virtual_pipeline_stages", "data_parallel"):
            if getattr(self, name) is not None:
                _check_size(self._label(name), getattr(self, name), "None or ")
        if self.pipeline_layout is not None:
            self._check_layout_string()
        elif self.first_stage_layers is not None or self.last_stage_layers is not None:
            self._check_first_last_sizes()
        if self.virtual_stages > 1 and self.pipeline_parallel < 2:
            raise ValueError(f"{self._label('virtual_pipeline_stages')}={self.virtual_pipeline_stages} needs "
                             f"{self._label('pipeline_parallel')} >= 2, got {self.pipeline_parallel}")

    def _label(self, name: str) -> str:
        return (self.labels or {}).get(name, name)

    def _check_layout_string(self) -> None:
        layout, pp = self.pipeline_layout, self.pipeline_parallel
        if not isinstance(layout, str) or not layout.strip():
            raise ValueError(f"{self._label('pipeline_layout')} must be 'auto' or a megatron layout string, got "
                             f"{layout!r}")
        if pp < 2:
            raise ValueError(f"{self._label('pipeline_layout')} needs {self._label('pipeline_parallel')} >= 2, got "
                             f"{pp!r}")
        if self.first_stage_layers is not None or self.last_stage_layers is not None:
            raise ValueError(f"{self._label('pipeline_layout')} cannot be combined with "
                             f"{self._label('first_stage_layers')} / {self._label('last_stage_layers')} (got "
                             f"{layout!r}, {self.first_stage_layers}, {self.last_stage_layers}): the layout gives "
                             "every chunk its layers")

    def _check_first_last_sizes(self) -> None:
        first, last = self._label("first_stage_layers"), self._label("last_stage_layers")
        if self.pipeline_parallel < 2:
            raise ValueError(f"{first} / {last} need {self._label('pipeline_parallel')} >= 2, got "
                             f"{self.pipeline_parallel}")
        for name in ("first_stage_layers", "last_stage_layers"):
            n = getattr(self, name)
            if n is None:
                continue
            _check_size(self._label(name), n, "None or ")
            if n % self.virtual_stages:
                raise ValueError(f"{self._label(name)}={n} is not divisible by "
                                 f"{self._label('virtual_pipeline_stages')}={self.virtual_stages}")

    # ----- sizes -----

    @property
    def virtual_stages(self) -> int:
        """Virtual pipeline stages per pipeline stage (1 without interleaving)."""
        return self.virtual_pipeline_stages or 1

    @property
    def num_chunks(self) -> int:
        """Model chunks the decoder layers are split into: pipeline stages x virtual stages."""
        return self.pipeline_parallel * self.virtual_stages

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.context_parallel * self.pipeline_parallel * self._known_data_parallel()

    @property
    def expert_data_parallel(self) -> int:
        """Ranks sharing one copy of each expert (ZeRO-1 shards the expert states over them)."""
        return self.world_size // (self.pipeline_parallel * self.expert_parallel * self.expert_tensor_parallel)

    def _known_data_parallel(self) -> int:
        if self.data_parallel is None:
            raise ValueError("ParallelLayout.data_parallel is not known yet: use for_world(world_size)")
        return self.data_parallel

    def for_world(self, world_size: int) -> ParallelLayout:
        """This layout on ``world_size`` ranks, data_parallel derived; ValueError naming the sizes when the world
        does not split into it."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world size must be an int >= 1, got {world_size!r}")
        tp, cp, pp = self.tensor_parallel, self.context_parallel, self.pipeline_parallel
        names = [self._label("tensor_parallel"), self._label("pipeline_parallel")]
        short = ["TP", "PP"]
        if cp > 1:
            names.append(self._label("context_parallel"))
            short.append("CP")
        if world_size % (tp * cp * pp):
            raise ValueError(f"world size {world_size} is not divisible by {' x '.join(names)}, i.e. not a positive "
                             f"multiple of {' x '.join(short)} = {tp * cp * pp}")
        dp = world_size // (tp * cp * pp)
        if self.data_parallel is not None and self.data_parallel != dp:
            raise ValueError(f"{self._label('data_parallel')}={self.data_parallel} does not fit world size "
                             f"{world_size}, which leaves {dp} data-parallel ranks")
        experts = self.expert_parallel * self.expert_tensor_parallel
        if (dp * cp * tp) % experts:
            raise ValueError(f"{self._label('expert_parallel')}={self.expert_parallel} must divide DP x TP = "
                             f"{dp * cp} x {tp} (the data- and tensor-parallel ranks of world size {world_size})")
        return dataclasses.replace(self, data_parallel=dp)

    # ----- the model on this layout -----

    def check_model(self, cfg: K2Config) -> None:
        """Raise ValueError, naming the sizes, when the K2 model ``cfg`` cannot be split into this layout."""
        tp = self.tensor_parallel
        if cfg.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not divisible by "
                             f"tensor_parallel={tp}")
        if cfg.n_routed_experts % self.expert_parallel:
            raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by "
                             f"expert_parallel={self.expert_parallel}")
        if self.expert_tensor_parallel != 1:
            raise ValueError(f"expert_tensor_parallel={self.expert_tensor_parallel} is not supported by the K2 "
                             "grouped-GEMM experts (use expert parallelism; K2 trains with expert_tensor_parallel=1)")
        if self.context_parallel != 1:
            raise ValueError(f"context_parallel={self.context_parallel} is not supported by the K2 core attention")
        self.chunk_layers(cfg.num_hidden_layers)
        for name in ("intermediate_size", "moe_intermediate_size", "vocab_size"):
            if getattr(cfg, name) % tp:
                raise ValueError(f"{name}={getattr(cfg, name)} is not divisible by tensor_parallel={tp}")
        if cfg.q_lora_rank is not None and cfg.q_lora_rank % tp:
            raise ValueError(f"q_lora_rank={cfg.q_lora_rank} is not divisible by tensor_parallel={tp}")
        if (cfg.kv_lora_rank + cfg.qk_rope_head_dim) % tp:
            raise ValueError(f"kv_lora_rank + qk_rope_head_dim = {cfg.kv_lora_rank + cfg.qk_rope_head_dim} is not "
                             f"divisible by tensor_parallel={tp}")

    def megatron_pipeline_layout(self, num_layers: int) -> str | None:
        """The megatron-core layout string of ``pipeline_layout`` ("auto" resolved) for ``num_layers`` decoder
        layers, or None without one."""
        if self.pipeline_layout is None:
            return None
        return resolve_pipeline_layout(num_layers, self.pipeline_parallel, self.virtual_pipeline_stages,
                                       self.pipeline_layout)

    def chunk_layers(self, num_layers: int) -> list[int]:
        """Decoder layers per model chunk, in chunk order; ValueError when ``num_layers`` does not split so."""
        pp, vpp, chunks = self.pipeline_parallel, self.virtual_stages, self.num_chunks
        if self.pipeline_layout is not None:
            return [chunk.count("t") for chunk in parse_pipeline_layout(self.megatron_pipeline_layout(num_layers))]
        if self.first_stage_layers is None and self.last_stage_layers is None:
            if num_layers % chunks:
                raise ValueError(f"num_hidden_layers={num_layers} is not divisible by pipeline_parallel x "
                                 f"virtual_pipeline_stages = {pp} x {vpp} = {chunks}")
            return [num_layers // chunks] * chunks
        first, last = self.first_stage_layers, self.last_stage_layers
        middle_layers = num_layers - (first or 0) - (last or 0)
        middle_stages = pp - (first is not None) - (last is not None)
        if middle_layers < 0 or bool(middle_layers) != bool(middle_stages):
            raise ValueError(f"{middle_layers} layers are left for {middle_stages} middle pipeline stages "
                             f"(num_hidden_layers={num_layers}, first_stage_layers={first}, "
                             f"last_stage_layers={last})")
        if middle_stages and middle_layers % (middle_stages * vpp):
            raise ValueError(f"the {middle_layers} middle layers are not divisible by middle stages x "
                             f"virtual_pipeline_stages = {middle_stages} x {vpp}")
        stage = [middle_layers // middle_stages if middle_stages else 0] * pp
        if first is not None:
            stage[0] = first
        if last is not None:
            stage[-1] = last
        return [stage[c % pp] // vpp for c in range(chunks)]

    def chunk_ranges(self, num_layers: int) -> list[range]:
        """Global (0-based) decoder-layer indices of every model chunk, in chunk order."""
        ranges, start = [], 0
        for n in self.chunk_layers(num_layers):
            ranges.append(range(start, start + n))
            start += n
        return ranges

    def stage_layers(self, num_layers: int, pp_rank: int, vp_stage: int | None = None) -> range:
        """Decoder layers of pipeline stage ``pp_rank``, virtual stage ``vp_stage`` (None: the only one)."""
        pp, vpp = self.pipeline_parallel, self.virtual_stages
        if vp_stage is None:
            if vpp > 1:
                raise ValueError(f"vp_stage is required: the pipeline layout has {vpp} virtual stages")
            vp_stage = 0
        if not 0 <= pp_rank < pp or not 0 <= vp_stage < vpp:
            raise ValueError(f"pp_rank={pp_rank} / vp_stage={vp_stage} out of range for a layout of {pp} pipeline "
                             f"stages x {vpp} virtual stages")
        return self.chunk_ranges(num_layers)[vp_stage * pp + pp_rank]


def _check_size(name: str, value, none_ok: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be {none_ok}an int >= 1, got {value!r}")


# ----- megatron-core's pipeline_model_parallel_layout strings -----

def balanced_chunk_layers(num_layers: int, chunks: int) -> list[int]:
    """Decoder layers per model chunk (chunk order) for ``num_layers`` over ``chunks`` chunks: an even split, or,
    when the layers do not divide, chunks of ceil / floor size with the short (floor) chunks at chunk 0 (which
    also holds the embedding) and at the end (the last holds the final norm and output layer). 61 layers over
    32 chunks: chunks 0, 30, 31 get 1 layer, the other 29 get 2. Raises ValueError when some chunk would get no
    layer."""
    for name, value in (("num_layers", num_layers), ("chunks", chunks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    base, extra = divmod(num_layers, chunks)
    if base == 0:
        raise ValueError(f"cannot balance {num_layers} layers over {chunks} pipeline chunks: every chunk needs at "
                         f"least one layer")
    if not extra:
        return [base] * chunks
    short = chunks - extra
    short_chunks = {0} | set(range(chunks - short + 1, chunks))
    return [base if c in short_chunks else base + 1 for c in range(chunks)]


def resolve_pipeline_layout(num_layers: int, pipeline_parallel: int, virtual_pipeline_stages: int | None,
                            layout: str) -> str:
    """The megatron-core layout string (TransformerConfig.pipeline_model_parallel_layout) of ``layout``,
    validated for ``num_layers`` decoder layers over pipeline_parallel x virtual_pipeline_stages chunks.

    layout: "auto" for balanced_chunk_layers' split (embedding "E" in chunk 0, loss "L" in the last chunk), or
    megatron's string: chunks separated by "|" in chunk order (all stages' virtual stage 0, then virtual
    stage 1, ...), "t" a decoder layer, "E" the embedding, "L" the loss (final norm + output layer), "x*n" and
    "(...)*n" repeat, commas are cosmetic; e.g. "Et|(tt|)*29,t|tL" for 61 layers on PP16 x VPP2. Raises
    ValueError naming pipeline_layout for a bad string, a chunk count other than PP x VPP, a decoder count
    other than num_layers, a chunk without decoder layers, or "E" / "L" not alone at the start of chunk 0 /
    end of the last chunk. Multi-token-prediction layers ("m") are not supported."""
    if not isinstance(layout, str) or not layout.strip():
        raise ValueError(f"pipeline_layout must be 'auto' or a megatron layout string, got {layout!r}")
    if not isinstance(pipeline_parallel, int) or pipeline_parallel < 2:
        raise ValueError(f"pipeline_layout needs pipeline_parallel >= 2, got {pipeline_parallel!r}")
    vpp = virtual_pipeline_stages or 1
    chunks = pipeline_parallel * vpp
    if layout.strip().lower() == "auto":
        counts = balanced_chunk_layers(num_layers, chunks)
        return "|".join(("E" if c == 0 else "") + "t" * n + ("L" if c == chunks - 1 else "")
                        for c, n in enumerate(counts))
    parsed = parse_pipeline_layout(layout)
    if len(parsed) != chunks:
        raise ValueError(f"pipeline_layout {layout!r} has {len(parsed)} chunks, but pipeline_parallel x "
                         f"virtual_pipeline_stages = {pipeline_parallel} x {vpp} = {chunks}")
    decoders = sum(chunk.count("t") for chunk in parsed)
    if decoders != num_layers:
        raise ValueError(f"pipeline_layout {layout!r} has {decoders} decoder layers ('t'), but "
                         f"num_hidden_layers={num_layers}")
    for c, chunk in enumerate(parsed):
        if "m" in chunk:
            raise ValueError(f"pipeline_layout {layout!r}: multi-token-prediction layers ('m') are not supported")
        if "t" not in chunk:
            raise ValueError(f"pipeline_layout {layout!r}: chunk {c} has no decoder layer ('t'); every chunk "
                             f"needs at least one")
        allowed = (["E"] if c == 0 else []) + ["t"] * chunk.count("t") + (["L"] if c == chunks - 1 else [])
        if chunk != allowed:
            raise ValueError(f"pipeline_layout {layout!r}: chunk {c} is {''.join(chunk)!r}; the embedding 'E' "
                             f"must open chunk 0 and the loss 'L' close the last chunk, each exactly once")
    return layout


def parse_pipeline_layout(layout: str) -> list[list[str]]:
    """Chunks of a megatron layout string as lists of layer letters ("E", "t", "L", "m"), with megatron-core's
    own parser (repeats unrolled); ValueError naming pipeline_layout for characters it does not know."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    letters = {LayerType.embedding: "E", LayerType.decoder: "t", LayerType.loss: "L", LayerType.mtp: "m"}
    try:
        chunks = PipelineParallelLayerLayout.parse_str_to_list(layout)
    except AssertionError as exc:
        raise ValueError(f"pipeline_layout {layout!r} is not a valid megatron layout string: {exc}") from None
    return [[letters[t] for t in chunk] for chunk in chunks]
