"""The K2 architecture as data: presets, validation and Hugging Face config.json I/O.

Field names follow the Hugging Face DeepSeek-V3 / Kimi K2 config.json, so a release config maps one to one.
The numbers of the ``k2`` preset are the released architecture (the Kimi K2 technical report,
arXiv:2507.20534, and the config.json of the moonshotai/Kimi-K2 releases); ``k2-mini`` and ``k2-tiny`` keep its
structure (MLA with q/kv LoRA, rope on a separate slice of the head, first layer dense, sigmoid router with
correction bias, one shared expert) at smaller widths.

Presets describe the architecture at its pretraining context with plain RoPE: K2 pretrains at 4096 without YaRN and
applies YaRN (factor 32 over 4096) in its long-context stage. The training stage decides the RoPE scaling
(``with_yarn``; the run config's model.yarn_factor); a config.json read with ``config_from_hf`` keeps its own (the
release: YaRN to 128K), so the release equals ``get_preset("k2").with_yarn(YarnConfig())``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from k2_megatron.config.schedule import YarnConfig

# model_type values whose config.json describes this architecture (K2 releases say "kimi_k2";
# transformers knows the same architecture as "deepseek_v3").
HF_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclass
class K2Config:
    """Architecture of a K2-class model (MLA attention + MoE), independent of any parallel layout."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int          # SwiGLU width of the dense layers (the first ``first_k_dense_replace``)
    moe_intermediate_size: int      # SwiGLU width of each routed expert (and of each shared expert)
    num_hidden_layers: int
    first_k_dense_replace: int      # layers [0, first_k_dense_replace) are dense, the rest MoE
    num_attention_heads: int
    q_lora_rank: int | None         # None: q comes from one projection of the hidden state (no q LoRA)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    routed_scaling_factor: float
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    # None: plain RoPE. YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim"} (the config.json "rope_scaling" block).
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Token ids are not part of the architecture; carried through config.json when known.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        self.validate()

    # ----- derived quantities -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def yarn(self) -> bool:
        return self.rope_scaling is not None

    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN, mscale = 0.1 * mscale_all_dim * ln(factor) + 1."""
        scale = 1.0 / math.sqrt(self.qk_head_dim)
        if self.rope_scaling is not None:
            factor = float(self.rope_scaling["factor"])
            mscale_all_dim = float(self.rope_scaling.get("mscale_all_dim", 0.0) or 0.0)
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def num_parameters(self) -> tuple[int, int]:
        """(total, activated per token) parameter counts, norms and router bias included."""
        h, n = self.hidden_size, self.num_attention_heads
        attn = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * n * self.qk_head_dim
                if self.q_lora_rank is not None else h * n * self.qk_head_dim)
        attn += h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * n * (self.qk_nope_head_dim + self.v_head_dim) + n * self.v_head_dim * h
        norms = 2 * h
        dense = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        router = self.n_routed_experts * h + self.n_routed_experts
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        per_moe_total = attn + norms + router + expert * (self.n_routed_experts + self.n_shared_experts)
        per_moe_active = attn + norms + router + expert * (self.num_experts_per_tok + self.n_shared_experts)
        per_dense = attn + norms + dense
        total = embed + self.first_k_dense_replace * per_dense + self.num_moe_layers * per_moe_total
        active = embed + self.first_k_dense_replace * per_dense + self.num_moe_layers * per_moe_active
        return total, active

    # ----- validation -----
    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"K2Config.{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"K2Config.q_lora_rank must be a positive int or None, got {self.q_lora_rank!r}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"K2Config.first_k_dense_replace must be in [0, num_hidden_layers="
                             f"{self.num_hidden_layers}], got {self.first_k_dense_replace}")
        if self.n_shared_experts < 0:
            raise ValueError(f"K2Config.n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"K2Config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                             f"({self.n_routed_experts})")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"K2Config.qk_rope_head_dim must be even (RoPE rotates pairs), got "
                             f"{self.qk_rope_head_dim}")
        if self.scoring_func != "sigmoid":
            raise ValueError(f"K2Config.scoring_func must be 'sigmoid' (K2 router), got {self.scoring_func!r}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"K2Config.n_routed_experts ({self.n_routed_experts}) must be divisible by n_group "
                             f"({self.n_group})")
        if self.topk_group > self.n_group:
            raise ValueError(f"K2Config.topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"K2Config.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ValueError(f"K2Config.rope_scaling: only YaRN is supported, got type {kind!r}")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ValueError(f"K2Config.rope_scaling (YaRN) needs {key!r}, got keys "
                                     f"{sorted(self.rope_scaling)}")

    def replace(self, **changes) -> "K2Config":
        return dataclasses.replace(self, **changes)

    def with_yarn(self, yarn: YarnConfig) -> "K2Config":
        """This architecture in a long-context stage: YaRN's rope_scaling, context factor x original positions."""
        return self.replace(rope_scaling=yarn.rope_scaling(), max_position_embeddings=yarn.max_position_embeddings)


def _k2() -> K2Config:
    # The released Kimi K2 (1.04T total, 32.6B activated), at its 4096-token pretraining context.
    return K2Config(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=64, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384,
        num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.827, norm_topk_prob=True,
        n_group=1, topk_group=1, rms_norm_eps=1e-6, rope_theta=50000.0, max_position_embeddings=4096)


def _k2_mini() -> K2Config:
    # K2's head dims (192/128, rope 64), router, shared expert and dense first layer at 1/7 the width:
    # ~1.5B total, ~0.45B activated (embeddings included); fits one 80 GB GPU with AdamW at seq 4096.
    return K2Config(
        vocab_size=163840, hidden_size=1024, intermediate_size=2688, moe_intermediate_size=256,
        num_hidden_layers=12, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=256,
        kv_lora_rank=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=128,
        num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.827, rope_theta=50000.0,
        max_position_embeddings=4096)


def _k2_tiny() -> K2Config:
    # Trains on a CPU in minutes: 4 layers (1 dense + 3 MoE, so 2 pipeline stages split evenly), 8 experts
    # top-2, 24/16 q.k/v head dims (the 192/128 ratio), a pretraining context of 128.
    return K2Config(
        vocab_size=1024, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.827, rope_theta=50000.0,
        max_position_embeddings=128)


PRESETS = {"k2": _k2, "k2-mini": _k2_mini, "k2-tiny": _k2_tiny}


def get_preset(name: str, **overrides) -> K2Config:
    """A fresh K2Config for preset ``name`` ("k2", "k2-mini", "k2-tiny"), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown K2 preset {name!r}; known presets: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


# ----- Hugging Face config.json -----

_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
              "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group", "rms_norm_eps",
              "max_position_embeddings", "tie_word_embeddings", "initializer_range", "bos_token_id",
              "eos_token_id", "pad_token_id")
# Keys we interpret ourselves (not carried in ``extra``).
_HANDLED = set(_ARCH_KEYS) | {"model_type", "rope_theta", "rope_scaling", "rope_parameters", "scoring_func",
                              "num_key_value_heads", "hidden_act", "topk_method", "moe_layer_freq",
                              "num_nextn_predict_layers", "attention_bias", "rope_interleave", "architectures",
                              "head_dim", "qk_head_dim", "transformers_version"}


def config_from_hf(hf: dict | str | os.PathLike) -> K2Config:
    """K2Config from a config.json (path, directory holding one, or its dict), model_type kimi_k2/deepseek_v3."""
    if not isinstance(hf, dict):
        path = os.fspath(hf)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"config.json model_type must be one of {HF_MODEL_TYPES}, got {model_type!r}")

    def expect(key, ok, what):
        if key in hf and hf[key] is not None and not ok(hf[key]):
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported: {what}")

    expect("hidden_act", lambda v: v == "silu", "the experts and dense MLPs are SwiGLU ('silu')")
    expect("scoring_func", lambda v: v == "sigmoid", "the K2 router scores with a sigmoid")
    expect("topk_method", lambda v: v == "noaux_tc", "the K2 router is aux-loss-free ('noaux_tc')")
    expect("moe_layer_freq", lambda v: v == 1, "every layer after first_k_dense_replace is MoE")
    expect("num_key_value_heads", lambda v: v == hf.get("num_attention_heads"), "MLA has one KV head per head")
    # DeepSeek-V3 releases (and every DeepseekV3Config saved with its defaults) have one multi-token-prediction
    # layer. It is not part of the model built here: the main model converts, the MTP tensors are the checkpoint
    # readers' business (k2_megatron.checkpoint.hf.safetensors_io.expected_mtp_shapes).
    expect("num_nextn_predict_layers", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
           "a non-negative number of multi-token-prediction layers")
    expect("attention_bias", lambda v: v is False, "attention projections have no bias")
    expect("rope_interleave", lambda v: v is True, "the rope dims are interleaved pairs (K2 release layout)")

    rope_theta = hf.get("rope_theta")
    rope_scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")  # transformers >= 5 layout
    if params:
        rope_theta = params.get("rope_theta", rope_theta)
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default" and rope_scaling is None:
            rope_scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
            rope_scaling["type"] = kind
    if rope_scaling is not None:
        rope_scaling = dict(rope_scaling)
        kind = rope_scaling.pop("rope_type", None) or rope_scaling.get("type")
        rope_scaling["type"] = kind
    kwargs = {k: hf[k] for k in _ARCH_KEYS if k in hf}
    missing = [k for k in _ARCH_KEYS[:17] if k not in kwargs]
    if missing:
        raise ValueError(f"config.json lacks required keys {missing}")
    if isinstance(kwargs.get("eos_token_id"), list) and len(kwargs["eos_token_id"]) == 1:
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    extra = {k: v for k, v in hf.items() if k not in _HANDLED}
    return K2Config(rope_theta=float(rope_theta if rope_theta is not None else 10000.0), rope_scaling=rope_scaling,
                    scoring_func=hf.get("scoring_func", "sigmoid"), extra=extra, **kwargs)


def config_to_hf(cfg: K2Config, model_type: str = "kimi_k2") -> dict:
    """The config.json dict of ``cfg`` in the release layout (rope_theta + rope_scaling, DeepseekV3 names)."""
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {HF_MODEL_TYPES}, got {model_type!r}")
    out = dict(cfg.extra)
    out.update({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": model_type,
        "hidden_act": "silu",
        "num_key_value_heads": cfg.num_attention_heads,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
        "scoring_func": cfg.scoring_func,
        "topk_method": "noaux_tc",
        "attention_bias": False,
        "rope_interleave": True,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
    })
    for key in _ARCH_KEYS:
        value = getattr(cfg, key)
        if value is not None or key == "q_lora_rank":
            out[key] = value
    return out


def save_hf_config(cfg: K2Config, path: str | os.PathLike, model_type: str = "kimi_k2") -> str:
    """Write config.json (``path`` is the file or its directory); returns the file path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config_to_hf(cfg, model_type), f, indent=2, sort_keys=True)
        f.write("\n")
    return path
