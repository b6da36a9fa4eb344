"""In-memory state-dict adapter: Hugging Face DeepSeek-V3 / Kimi K2 <-> our megatron-core K2 model.

Both directions work on whole (unsharded) state dicts with megatron-core's module names of a
single-rank model (``GPTModel.state_dict()`` of ``build_k2_model`` with TP = PP = EP = 1):

    hf_to_megatron(hf_state_dict, cfg) -> megatron state dict
    megatron_to_hf(megatron_state_dict, cfg, expert_layout="fused"|"per_expert") -> HF state dict

Name map per layer i (HF ``model.layers.i.`` <-> megatron ``decoder.layers.i.``); every tensor is copied
unchanged except the SwiGLU pairs, which megatron keeps as one [gate; up] matrix:
    self_attn.q_a_proj / q_a_layernorm / q_b_proj   <-> self_attention.linear_q_down_proj / q_layernorm /
                                                        linear_q_up_proj
    self_attn.q_proj (no q LoRA)                    <-> self_attention.linear_q_proj
    self_attn.kv_a_proj_with_mqa / kv_a_layernorm   <-> self_attention.linear_kv_down_proj / kv_layernorm
    self_attn.kv_b_proj / o_proj                    <-> self_attention.linear_kv_up_proj / linear_proj
    input_layernorm / post_attention_layernorm      <-> input_layernorm / pre_mlp_layernorm
    dense: mlp.{gate,up}_proj, mlp.down_proj        <-> mlp.linear_fc1 ([gate; up]), mlp.linear_fc2
    MoE:   mlp.gate.weight, mlp.gate.e_score_correction_bias
                                                    <-> mlp.router.weight, mlp.router.expert_bias (fp32)
           mlp.experts.gate_up_proj [E, 2F, H]      <-> mlp.experts.linear_fc1_weight (same layout)
           mlp.experts.down_proj [E, H, F]          <-> mlp.experts.linear_fc2_weight (same layout)
           (or per expert: mlp.experts.e.{gate,up,down}_proj.weight, the release-file layout)
           mlp.shared_experts.{gate,up,down}_proj   <-> mlp.shared_experts.linear_fc1 ([gate; up]), linear_fc2
    model.embed_tokens / model.norm / lm_head       <-> embedding.word_embeddings / decoder.final_layernorm /
                                                        output_layer

The head layouts agree without permutation: q_b_proj rows are per head [q_nope | q_rope], kv_a_proj rows
[c_kv | k_rope], kv_b_proj rows per head [k_nope | v], and transformers' rope_interleave=True matches
megatron-core's interleaved MLA rope.

``load_megatron_state_dict(model, full_state_dict)`` loads such a whole state dict into one rank of a
model built with any TP / PP / EP layout (it slices each tensor the way megatron shards it); it is how
tests and tools give every layout the same weights.
"""

from __future__ import annotations

import re

import torch

from k2_megatron.config.model import K2Config

_ATTN = {
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
    "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
_ROUTER = {
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
}
_GLOBAL = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


class StateDictMismatch(KeyError):
    """A state dict lacks expected tensors or holds unexpected ones (the message lists them)."""

    def __str__(self):
        return str(self.args[0])


def _attn_keys(cfg: K2Config) -> list[str]:
    skip = ({"self_attn.q_proj.weight"} if cfg.q_lora_rank is not None else
            {"self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"})
    return [k for k in _ATTN if k not in skip]


def _take(sd: dict, key: str, used: set, missing: list):
    if key not in sd:
        missing.append(key)
        return None
    used.add(key)
    return sd[key]


def _check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def hf_to_megatron(hf: dict, cfg: K2Config, *, strict: bool = True, experts: range | None = None) -> dict:
    """megatron (single-rank) state dict from a Hugging Face DeepseekV3/K2 one (fused or per-expert experts).

    strict: raise StateDictMismatch when HF tensors are missing or left unused (``rotary_emb.inv_freq``
    buffers and FP8 ``*_scale_inv`` siblings excepted: dequantise FP8 before calling this).
    experts: the routed experts to map (default: all); per-expert HF tensors of other experts are not expected,
    and the expert stacks hold ``len(experts)`` experts (one expert-parallel rank's: see
    ``load_megatron_state_dict(..., local_experts=True)``).
    """
    experts = range(cfg.n_routed_experts) if experts is None else experts
    if not (0 <= experts.start <= experts.stop <= cfg.n_routed_experts and experts.step == 1):
        raise ValueError(f"experts: {experts} is not a contiguous range of the {cfg.n_routed_experts} experts")
    out, used, missing = {}, set(), []
    for hk, mk in _GLOBAL.items():
        if hk == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = _take(hf, hk, used, missing)
        if t is not None:
            out[mk] = t
    E, F_moe, F_dense, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for k in _attn_keys(cfg):
            t = _take(hf, hp + k, used, missing)
            if t is not None:
                out[mp + _ATTN[k]] = t
        if i < cfg.first_k_dense_replace:
            g, u, d = (_take(hf, hp + f"mlp.{n}_proj.weight", used, missing) for n in ("gate", "up", "down"))
            if g is not None and u is not None:
                out[mp + "mlp.linear_fc1.weight"] = torch.cat([g, u], 0)
            if d is not None:
                out[mp + "mlp.linear_fc2.weight"] = d
            continue
        for hk, mk in _ROUTER.items():
            t = _take(hf, hp + hk, used, missing)
            if t is not None:
                out[mp + mk] = t.float() if mk.endswith("expert_bias") else t
        if hp + "mlp.experts.gate_up_proj" in hf:  # fused stacks of every expert: this range's rows
            w1 = _take(hf, hp + "mlp.experts.gate_up_proj", used, missing)
            w2 = _take(hf, hp + "mlp.experts.down_proj", used, missing)
            if w1 is not None:
                _check_shape(hp + "mlp.experts.gate_up_proj", w1, (E, 2 * F_moe, H))
                w1 = w1[experts.start:experts.stop]
            if w2 is not None:
                _check_shape(hp + "mlp.experts.down_proj", w2, (E, H, F_moe))
                w2 = w2[experts.start:experts.stop]
        else:
            gu, dn = [], []
            for e in experts:
                ep = hp + f"mlp.experts.{e}."
                g, u, d = (_take(hf, ep + f"{n}_proj.weight", used, missing) for n in ("gate", "up", "down"))
                if g is not None and u is not None and d is not None:
                    gu.append(torch.cat([g, u], 0))
                    dn.append(d)
            w1 = torch.stack(gu) if len(gu) == len(experts) else None
            w2 = torch.stack(dn) if len(dn) == len(experts) else None
        if w1 is not None:
            _check_shape(hp + "mlp.experts (gate/up)", w1, (len(experts), 2 * F_moe, H))
            out[mp + "mlp.experts.linear_fc1_weight"] = w1
        if w2 is not None:
            _check_shape(hp + "mlp.experts (down)", w2, (len(experts), H, F_moe))
            out[mp + "mlp.experts.linear_fc2_weight"] = w2
        if cfg.n_shared_experts:
            sp = hp + "mlp.shared_experts."
            g, u, d = (_take(hf, sp + f"{n}_proj.weight", used, missing) for n in ("gate", "up", "down"))
            if g is not None and u is not None:
                out[mp + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([g, u], 0)
            if d is not None:
                out[mp + "mlp.shared_experts.linear_fc2.weight"] = d
    if strict:
        ignorable = re.compile(r"(rotary_emb\.inv_freq|_scale_inv)$")
        unused = sorted(k for k in hf if k not in used and not ignorable.search(k))
        if missing or unused:
            raise StateDictMismatch(f"HF state dict does not match the K2 config: missing {missing[:20]}"
                                    f"{' ...' if len(missing) > 20 else ''}, unexpected {unused[:20]}"
                                    f"{' ...' if len(unused) > 20 else ''}")
    dense_w = out.get("decoder.layers.0.mlp.linear_fc2.weight")
    if dense_w is not None and cfg.first_k_dense_replace:
        _check_shape("dense mlp down_proj", dense_w, (H, F_dense))
    return out


def megatron_to_hf(meg: dict, cfg: K2Config, *, expert_layout: str = "fused", strict: bool = True) -> dict:
    """Hugging Face state dict from a megatron (single-rank) one.

    expert_layout: "fused" (transformers' in-memory mlp.experts.gate_up_proj / down_proj) or "per_expert"
    (mlp.experts.e.{gate,up,down}_proj.weight, the layout of the release files).
    """
    if expert_layout not in ("fused", "per_expert"):
        raise ValueError(f"expert_layout must be 'fused' or 'per_expert', got {expert_layout!r}")
    meg = {k: v for k, v in meg.items() if not k.endswith("_extra_state")}
    out, used, missing = {}, set(), []
    for hk, mk in _GLOBAL.items():
        if hk == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = _take(meg, mk, used, missing)
        if t is not None:
            out[hk] = t
    for i in range(cfg.num_hidden_layers):
        hp, mp = f"model.layers.{i}.", f"decoder.layers.{i}."
        for k in _attn_keys(cfg):
            t = _take(meg, mp + _ATTN[k], used, missing)
            if t is not None:
                out[hp + k] = t
        if i < cfg.first_k_dense_replace:
            fc1 = _take(meg, mp + "mlp.linear_fc1.weight", used, missing)
            fc2 = _take(meg, mp + "mlp.linear_fc2.weight", used, missing)
            if fc1 is not None:
                out[hp + "mlp.gate_proj.weight"], out[hp + "mlp.up_proj.weight"] = (c.clone() for c in fc1.chunk(2, 0))
            if fc2 is not None:
                out[hp + "mlp.down_proj.weight"] = fc2
            continue
        for hk, mk in _ROUTER.items():
            t = _take(meg, mp + mk, used, missing)
            if t is not None:
                out[hp + hk] = t
        w1 = _take(meg, mp + "mlp.experts.linear_fc1_weight", used, missing)
        w2 = _take(meg, mp + "mlp.experts.linear_fc2_weight", used, missing)
        if w1 is not None and w2 is not None:
            if expert_layout == "fused":
                out[hp + "mlp.experts.gate_up_proj"] = w1
                out[hp + "mlp.experts.down_proj"] = w2
            else:
                for e in range(w1.shape[0]):
                    g, u = w1[e].chunk(2, 0)
                    out[hp + f"mlp.experts.{e}.gate_proj.weight"] = g.clone()
                    out[hp + f"mlp.experts.{e}.up_proj.weight"] = u.clone()
                    out[hp + f"mlp.experts.{e}.down_proj.weight"] = w2[e].clone()
        if cfg.n_shared_experts:
            fc1 = _take(meg, mp + "mlp.shared_experts.linear_fc1.weight", used, missing)
            fc2 = _take(meg, mp + "mlp.shared_experts.linear_fc2.weight", used, missing)
            if fc1 is not None:
                g, u = fc1.chunk(2, 0)
                out[hp + "mlp.shared_experts.gate_proj.weight"] = g.clone()
                out[hp + "mlp.shared_experts.up_proj.weight"] = u.clone()
            if fc2 is not None:
                out[hp + "mlp.shared_experts.down_proj.weight"] = fc2
    if strict:
        unused = sorted(k for k in meg if k not in used)
        if missing or unused:
            raise StateDictMismatch(f"megatron state dict does not match the K2 config: missing {missing[:20]}, "
                                    f"unexpected {unused[:20]}")
    return out


# ----- loading a whole state dict into one rank of a (TP / PP / EP) sharded model -----

_GLU_FC1 = re.compile(r"(^|\.)(mlp|shared_experts)\.linear_fc1\.weight$")
_EXPERT = re.compile(r"\.experts\.linear_fc[12]_weight$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_layer_names(model) -> dict[int, int]:
    """local layer index -> global 0-based layer index of this pipeline (virtual) stage."""
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


def _shard(name: str, full: torch.Tensor, local: torch.Tensor, param, tp_rank: int, tp_size: int,
           ep_rank: int, ep_size: int, local_experts: bool = False) -> torch.Tensor:
    if _EXPERT.search(name):
        n = local.shape[0]
        if local_experts:
            if full.shape[0] != n:
                raise ValueError(f"{name}: {full.shape[0]} experts given as this rank's, the model holds {n}")
            return full
        if full.shape[0] != n * ep_size:
            raise ValueError(f"{name}: {full.shape[0]} experts in the state dict, model has {n} x EP {ep_size}")
        return full[ep_rank * n:(ep_rank + 1) * n]
    if param is not None and getattr(param, "tensor_model_parallel", False) and tp_size > 1:
        dim = param.partition_dim
        if _GLU_FC1.search(name):
            gate, up = full.chunk(2, 0)
            return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], 0)
        return full.chunk(tp_size, dim)[tp_rank]
    return full


def local_expert_range(num_experts: int) -> range:
    """The routed experts of this expert-parallel rank (megatron's contiguous split of the experts)."""
    from megatron.core import parallel_state

    size = parallel_state.get_expert_model_parallel_world_size()
    if num_experts % size:
        raise ValueError(f"num_experts: {num_experts} experts do not split over expert parallel size {size}")
    n = num_experts // size
    rank = parallel_state.get_expert_model_parallel_rank()
    return range(rank * n, (rank + 1) * n)


@torch.no_grad()
def load_megatron_state_dict(model, full: dict, *, strict: bool = True, local_experts: bool = False) -> None:
    """Copy a whole single-rank megatron state dict into ``model`` (one rank of any TP / PP / EP layout).

    local_experts: the expert stacks hold this expert-parallel rank's experts only (``local_expert_range``; as
    ``hf_to_megatron(..., experts=local_expert_range(E))`` makes them), not all of them."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    to_global = _global_layer_names(model)
    params = dict(model.named_parameters())
    missing = []
    for name, local in model.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state") or not torch.is_tensor(local):
            continue
        m = _LAYER.match(name)
        key = name if m is None else f"decoder.layers.{to_global[int(m.group(1))]}." + name[m.end():]
        if key not in full:
            missing.append(key)
            continue
        value = _shard(name, full[key], local, params.get(name), tp_rank, tp_size, ep_rank, ep_size, local_experts)
        if tuple(value.shape) != tuple(local.shape):
            raise ValueError(f"{name} (from {key}): shard shape {tuple(value.shape)} != parameter shape "
                             f"{tuple(local.shape)}")
        local.copy_(value)
    if strict and missing:
        raise StateDictMismatch(f"state dict lacks {missing[:20]}")
