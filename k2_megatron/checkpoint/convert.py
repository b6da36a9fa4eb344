"""Checkpoint conversion: Hugging Face (DeepSeek-V3 / Kimi K2, BF16 or FP8) <-> megatron, and HF -> HF.

Library functions behind tools/convert_checkpoint.py; each returns ConversionStats (tensors, bytes, time,
MB/s, peak resident memory).

- ``convert_hf_to_hf``: re-shard / re-dtype / FP8-dequantise (or FP8-export) a Hugging Face directory.
  Fully streaming: one tensor group (a weight and its scale_inv) in memory at a time; the writer sends each
  tensor straight to its shard file.
- ``convert_hf_to_megatron``: HF directory -> megatron dist_checkpointing (torch_dist) directory. The HF
  side streams one transformer layer at a time into this process's model (any TP / PP / EP layout, all ranks
  of a torchrun job calling it together; a single process builds the TP = PP = EP = 1 model); each rank reads
  the layers of its pipeline stage and, of their routed experts, only its own (per-expert release files). A torch_dist
  checkpoint is layout-independent: megatron reshards it on load into any TP / PP / EP layout.
- ``convert_megatron_to_hf``: the reverse, streaming one layer at a time straight from the torch_dist files
  (torch DCP partial loads; no megatron, no model, no process group), whatever layout saved them.
- ``compare_hf_checkpoints`` (tensor by tensor) and ``compare_logits`` (transformers vs our megatron model,
  small models only) for validation.

The megatron checkpoint directory holds the dist_checkpointing files plus ``hf_config.json`` (the HF
config.json the model came from, so the reverse direction needs no other input).

Peak memory: the process's peak resident set size during the conversion above its resident size at the
start: Linux VmHWM after resetting it through /proc/self/clear_refs, else the ru_maxrss delta (a lower
bound: it cannot see a peak below an earlier high-water mark of the process). tracemalloc is not used:
it does not see torch's tensor allocations.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field

import torch

from k2_megatron.checkpoint.errors import CheckpointError
from k2_megatron.checkpoint.hf.fp8 import (FP8_BLOCK_SIZE, SCALE_SUFFIX, is_fp8_quantized_in_release,
                                           quantize_fp8_blockwise)
from k2_megatron.checkpoint.hf.safetensors_io import (
    CONFIG_NAME,
    INDEX_NAME,
    HFCheckpoint,
    ShardedSafetensorsWriter,
    make_staging_dir,
    move_into_place,
)
from k2_megatron.config.model import HF_MODEL_TYPES, K2Config, config_from_hf

MEGATRON_HF_CONFIG = "hf_config.json"
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_BLOCK_SIZE, FP8_BLOCK_SIZE]}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
_KEEP_FP32 = re.compile(r"e_score_correction_bias$")  # fp32 in the release and in megatron's router
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.")


def resolve_dtype(dtype) -> torch.dtype | None:
    """None / "keep" -> None (keep each tensor's dtype); "bf16", "fp32" (or the torch dtypes) otherwise."""
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be 'bf16', 'fp32' or 'keep', got {dtype!r}")


# ----- measurement -----

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block, above its resident size at the start.

    ``peak_bytes`` and ``method`` (which measurement was used) are set on exit.
    """

    def __enter__(self):
        self.method = None
        self._start_rss = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            if self._start_rss is not None and _proc_status_kib("VmHWM") is not None:
                self.method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS at start"
        except OSError:
            pass
        self._start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method is not None:
            self.peak_bytes = max(0, _proc_status_kib("VmHWM") - self._start_rss) * 1024
        else:
            self.method = "ru_maxrss delta (lower bound)"
            self.peak_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start_maxrss) * 1024
        return False


@dataclass
class ConversionStats:
    direction: str
    src: str
    dst: str
    tensors: int = 0
    bytes_read: int = 0            # tensor bytes read from the source (as stored: FP8 + scales for FP8)
    bytes_written: int = 0         # bytes of the files written (headers included)
    seconds: float = 0.0
    peak_bytes: int = 0
    peak_method: str = ""
    largest_group_bytes: int = 0   # the largest unit read at once (tensor group, or layer for megatron)
    notes: list[str] = field(default_factory=list)  # one line each, printed after the summary

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (f"{self.direction}: {self.tensors} tensors, read {self.bytes_read / 1e6:.1f} MB, wrote "
                f"{self.bytes_written / 1e6:.1f} MB in {self.seconds:.2f} s ({self.mb_per_s:.1f} MB/s read); peak "
                f"memory +{self.peak_bytes / 2**20:.1f} MiB [{self.peak_method}]; largest unit read at once "
                f"{self.largest_group_bytes / 2**20:.1f} MiB" + "".join(f"\n{note}" for note in self.notes))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True)


def _check_paths(src: str, dst: str) -> tuple[str, str]:
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise CheckpointError(f"output {dst} must not be the input {src}, inside it, or contain it")
    return src, dst


def _output_config(config: dict, *, dtype: torch.dtype | None, fp8: bool, model_type: str | None) -> dict:
    out = dict(config)
    if model_type is not None:
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"model_type must be one of {HF_MODEL_TYPES}, got {model_type!r}")
        out["model_type"] = model_type
    if fp8:
        out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    else:
        out.pop("quantization_config", None)
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
        for k in keys:
            out[k] = name
    return out


def _emit(writer: ShardedSafetensorsWriter, name: str, t: torch.Tensor, *, dtype, fp8_export: bool) -> int:
    """Write one (already dequantised) tensor: cast, or FP8-quantise a release-quantised linear weight."""
    if fp8_export and is_fp8_quantized_in_release(name) and t.dim() == 2:
        q, s = quantize_fp8_blockwise(t, name=name)
        writer.add(name, q)
        writer.add(name + SCALE_SUFFIX, s)
        return 2
    if _KEEP_FP32.search(name):
        t = t.float()
    elif dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    writer.add(name, t)
    return 1


def _extra_files(src: str) -> dict[str, str]:
    """Non-weight files of an HF directory to carry over (tokenizer, generation config, remote code)."""
    out = {}
    for f in sorted(os.listdir(src)):
        p = os.path.join(src, f)
        if (os.path.isfile(p) and not f.startswith(".") and not f.endswith(".safetensors")
                and f not in (CONFIG_NAME, INDEX_NAME)):
            out[f] = p
    return out


# ----- HF -> HF -----

def convert_hf_to_hf(src, dst, *, dtype=None, fp8_export: bool = False, max_shard_size="5GB",
                     overwrite: bool = False, model_type: str | None = None, progress: bool = False,
                     copy_extra_files: bool = True) -> ConversionStats:
    """Re-shard / re-dtype a Hugging Face checkpoint; FP8 weights are dequantised unless ``fp8_export``.

    dtype: "bf16" / "fp32" / None (keep; FP8 dequantises to bf16). e_score_correction_bias stays fp32.
    fp8_export: release-quantised linear weights are written as FP8 + scale_inv (FP8 sources pass through
    unchanged, others are quantised with ``quantize_fp8_blockwise``), config.json gets quantization_config.
    Everything is validated before the output is created; the output appears only when complete.
    """
    src, dst = _check_paths(src, dst)
    out_dtype = resolve_dtype(dtype)
    stats = ConversionStats("hf->hf", src, dst)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        ckpt = HFCheckpoint(src)
        ckpt.validate()
        config = _output_config(ckpt.config_dict, dtype=out_dtype, fp8=fp8_export, model_type=model_type)
        if ckpt.mtp_tensors:
            stats.notes.append(_mtp_note(ckpt, "kept", "converted like every other tensor"))
        groups = ckpt.groups()
        with ShardedSafetensorsWriter(dst, max_shard_size=max_shard_size, overwrite=overwrite) as writer, \
                _progress(ckpt.total_bytes, "hf->hf", progress) as bar:
            for group in groups:
                nbytes = ckpt.group_bytes(group)
                stats.largest_group_bytes = max(stats.largest_group_bytes, nbytes)
                if fp8_export and len(group) == 2:  # FP8 source kept as is
                    for name, t in ckpt.read_group(group, dequantize=False):
                        writer.add(name, t)
                        stats.tensors += 1
                else:
                    # cast in _emit, not while reading: the router bias must not pass through bf16
                    for name, t in ckpt.read_group(group, dtype=out_dtype if len(group) == 2 else None):
                        stats.tensors += _emit(writer, name, t, dtype=out_dtype, fp8_export=fp8_export)
                stats.bytes_read += nbytes
                bar.update(nbytes)
            writer.commit(config, _extra_files(src) if copy_extra_files else None)
            stats.bytes_written = writer.bytes_written
    stats.seconds = time.perf_counter() - t0
    stats.peak_bytes, stats.peak_method = mem.peak_bytes, mem.method
    return stats


def compare_hf_checkpoints(a, b, *, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """{name: max |a - b|} over every tensor of two HF checkpoints (FP8 dequantised, both in ``dtype``),
    streamed group by group. Raises CheckpointError if their tensor names differ."""
    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    names_a = {n for n in ca.tensors if not n.endswith(SCALE_SUFFIX)}
    names_b = {n for n in cb.tensors if not n.endswith(SCALE_SUFFIX)}
    if names_a != names_b:
        raise CheckpointError(f"{ca.path} and {cb.path} hold different tensors: only in the first "
                              f"{sorted(names_a - names_b)[:20]}, only in the second {sorted(names_b - names_a)[:20]}")
    groups_b = {g[0]: g for g in cb.groups()}
    out = {}
    for group in ca.groups():
        (name, ta), = ca.read_group(group, dtype=dtype)
        (_, tb), = cb.read_group(groups_b[name], dtype=dtype)
        if ta.shape != tb.shape:
            raise CheckpointError(f"tensor {name!r}: shape {list(ta.shape)} in {ca.path}, "
                                  f"{list(tb.shape)} in {cb.path}")
        out[name] = (ta.to(dtype) - tb.to(dtype)).abs().max().item() if ta.numel() else 0.0
    return out


def _compare(name: str, ta: torch.Tensor, tb: torch.Tensor, stored_a, stored_b) -> tuple[str | None, float]:
    """(a failure line or None, max|diff| / max|a|) for a tensor stored as ``stored_a`` and converted to
    ``stored_b``, both read as ``ta``/``tb``; the tolerance follows from the two storage dtypes."""
    if ta.shape != tb.shape:
        return f"{name}: shape {list(ta.shape)} -> {list(tb.shape)}", float("inf")
    if not ta.numel():
        return None, 0.0
    diff = (ta.float() - tb.float()).abs().max().item()
    amax = ta.abs().max().item()
    tol = _tolerance(stored_a, stored_b, amax)
    problem = f"{name}: max |diff| {diff:.3g} > tolerance {tol:.3g} ({stored_a} -> {stored_b})" if diff > tol else None
    return problem, diff / amax if amax else diff


def _tolerance(stored_src: torch.dtype, stored_dst: torch.dtype, amax: float) -> float:
    """Allowed max |dst - src| of one tensor (see validate_hf_conversion)."""
    if stored_dst == torch.float8_e4m3fn and stored_src != torch.float8_e4m3fn:
        return amax / 16
    if stored_dst == torch.bfloat16 and stored_src != torch.bfloat16:
        return amax * 2.0 ** -8
    return 0.0


def validate_hf_conversion(src, dst) -> tuple[bool, list[str]]:
    """Compare every tensor of ``dst`` with ``src`` (both read in float32, FP8 dequantised), streaming.

    Tolerance per tensor, by how it was stored: exact where nothing was rounded (same dtype, FP8 passed
    through, widening casts); max |diff| <= 2^-8 * max |src| for a narrowing cast to bf16 (half a bf16 ulp
    is 2^-9 relative); <= max |src| / 16 for an FP8 export (half an e4m3 step is 16 scale units, the scale
    is ~amax / 448). Returns (ok, report lines: failures, then a summary)."""
    ca, cb = HFCheckpoint(src), HFCheckpoint(dst)
    names_a = {n for n in ca.tensors if not n.endswith(SCALE_SUFFIX)}
    names_b = {n for n in cb.tensors if not n.endswith(SCALE_SUFFIX)}
    if names_a != names_b:
        return False, [f"tensor names differ: only in {ca.path}: {sorted(names_a - names_b)[:20]}, only in "
                       f"{cb.path}: {sorted(names_b - names_a)[:20]}"]
    groups_b = {g[0]: g for g in cb.groups()}
    lines, ok, worst = [], True, (0.0, "")
    for group in ca.groups():
        (name, ta), = ca.read_group(group, dtype=torch.float32)
        (_, tb), = cb.read_group(groups_b[name], dtype=torch.float32)
        problem, rel = _compare(name, ta, tb, ca.tensors[name].dtype, cb.tensors[name].dtype)
        if problem:
            ok = False
            lines.append(problem)
        worst = max(worst, (rel, name))
    lines.append(f"{len(names_a)} tensors compared; largest max|diff| / max|src|: {worst[0]:.3g} ({worst[1]})")
    return ok, lines


# ----- megatron side -----

def _megatron_ready(cfg: K2Config, params_dtype: torch.dtype):
    """This process's model (built for the initialised parallel layout, or TP = PP = EP = 1 on a CPU)."""
    from megatron.core import parallel_state

    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    if not parallel_state.model_parallel_is_initialized():
        init_distributed_cpu()  # seam: a GPU job initialises its own parallel_state (torchrun + NCCL) first
    return build_k2_model(cfg, params_dtype=params_dtype)


def _global_layers(model) -> dict[int, int]:
    """local layer index -> global 0-based layer index of this pipeline stage."""
    layers = model.decoder.layers if getattr(model, "decoder", None) is not None else []
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


def _to_global_key(name: str, to_global: dict[int, int]) -> str:
    m = re.match(r"^decoder\.layers\.(\d+)\.", name)
    return name if m is None else f"decoder.layers.{to_global[int(m.group(1))]}." + name[m.end():]


def _expert_of(name: str) -> int | None:
    """The routed expert a per-expert HF tensor belongs to (None for every other tensor)."""
    m = _EXPERT.match(name)
    return None if m is None else int(m.group(1))


def _hf_layer_groups(ckpt: HFCheckpoint) -> list[tuple[int | None, list[list[str]]]]:
    """Tensor groups per transformer layer (None: embeddings, final norm, lm_head), in layer order."""
    by_layer: dict[int | None, list[list[str]]] = {}
    for g in ckpt.groups():
        m = _LAYER.match(g[0])
        by_layer.setdefault(int(m.group(1)) if m else None, []).append(g)
    return sorted(by_layer.items(), key=lambda kv: -1 if kv[0] is None else kv[0])


def convert_hf_to_megatron(src, dst, *, params_dtype=None, overwrite: bool = False,
                           progress: bool = False) -> ConversionStats:
    """HF directory -> megatron dist_checkpointing directory (+ hf_config.json), written atomically.

    params_dtype: the model's parameter dtype ("bf16" / "fp32"); default: bf16 for an FP8 or BF16 source,
    fp32 for an FP32 one. One layer of HF tensors (dequantised) is in memory at a time, plus this rank's model;
    of a layer's per-expert tensors only this expert-parallel rank's are read (a fused ``mlp.experts.gate_up_proj``
    stack, not a release format, is read whole and sliced).
    """
    from megatron.core import dist_checkpointing

    from k2_megatron.checkpoint.hf.adapter import hf_to_megatron, load_megatron_state_dict, local_expert_range

    src, dst = _check_paths(src, dst)
    stats = ConversionStats("hf->megatron", src, dst)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        ckpt = HFCheckpoint(src)
        ckpt.validate()
        cfg = ckpt.config
        dtype = resolve_dtype(params_dtype)
        if dtype is None:
            dtype = (torch.float32 if all(t.dtype == torch.float32 for t in ckpt.tensors.values()
                                          if t.name.endswith("proj.weight")) else torch.bfloat16)
        model = _megatron_ready(cfg, dtype)
        if ckpt.mtp_shapes:
            stats.notes.append(_mtp_note(ckpt, "skipped", "the megatron model has no multi-token-prediction layer"))
        experts = local_expert_range(cfg.n_routed_experts)  # this expert-parallel rank's: the only ones read
        to_global = _global_layers(model)
        wanted_layers = set(to_global.values())
        needed_globals = set()
        if model.pre_process or (model.post_process and cfg.tie_word_embeddings):
            needed_globals.add("model.embed_tokens.weight")
        if model.post_process:
            needed_globals.update({"model.norm.weight", "lm_head.weight"})
        loaded: set[str] = set()
        staging = [None]
        if torch.distributed.get_rank() == 0:
            try:
                staging = [make_staging_dir(dst, overwrite=overwrite)]
            except CheckpointError as exc:
                staging = [exc]
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list(staging, src=0)  # every rank writes into rank 0's directory
        if isinstance(staging[0], CheckpointError):
            raise staging[0]
        staging = staging[0]
        try:
            with _progress(ckpt.total_bytes, "hf->megatron", progress) as bar:
                for layer, groups in _hf_layer_groups(ckpt):
                    full = sum(ckpt.group_bytes(g) for g in groups)
                    if layer is None:  # embedding on the first stage, final norm and head on the last
                        groups = [g for g in groups if g[0] in needed_globals]
                    elif layer not in wanted_layers:
                        groups = []
                    else:
                        groups = [g for g in groups if _expert_of(g[0]) is None or _expert_of(g[0]) in experts]
                    if not groups:  # not on this pipeline stage
                        bar.update(full)
                        continue
                    nbytes = sum(ckpt.group_bytes(g) for g in groups)
                    # FP8 dequantises straight to the model dtype; the rest is cast by the parameter copy
                    hf = {n: t for g in groups for n, t in ckpt.read_group(g, dtype=dtype if len(g) == 2 else None)}
                    meg = hf_to_megatron(hf, cfg, strict=False, experts=experts)
                    load_megatron_state_dict(model, meg, strict=False, local_experts=True)
                    loaded.update(meg)
                    stats.tensors += len(hf)
                    stats.bytes_read += nbytes
                    stats.largest_group_bytes = max(stats.largest_group_bytes, nbytes)
                    del hf, meg
                    bar.update(full)
            needed = {_to_global_key(k, to_global) for k, v in model.state_dict().items()
                      if torch.is_tensor(v) and not k.endswith("_extra_state")}
            if needed - loaded:
                raise CheckpointError(f"{src}: no value for model tensors {sorted(needed - loaded)[:20]}")
            dist_checkpointing.save(model.sharded_state_dict(), staging)
            if torch.distributed.get_rank() == 0:
                # the source config.json, saying the stored dtype, no FP8 and no MTP layers (what megatron -> hf
                # writes by default)
                config = _output_config(ckpt.config_dict, dtype=dtype, fp8=False, model_type=None)
                config["num_nextn_predict_layers"] = 0
                with open(os.path.join(staging, MEGATRON_HF_CONFIG), "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
            torch.distributed.barrier()
            if torch.distributed.get_rank() == 0:
                move_into_place(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        stats.bytes_written = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs)
    stats.seconds = time.perf_counter() - t0
    stats.peak_bytes, stats.peak_method = mem.peak_bytes, mem.method
    return stats


def _mtp_note(ckpt: HFCheckpoint, verb: str, why: str) -> str:
    """One line on a source's multi-token-prediction layers (DeepSeek-V3 has one) and what happened to them."""
    first, n = ckpt.config.num_hidden_layers, ckpt.config_dict.get("num_nextn_predict_layers") or 0
    layers = f"model.layers.{first}.*" if n == 1 else f"model.layers.{first}-{first + n - 1}.*"
    if not ckpt.mtp_tensors:
        return (f"multi-token prediction: config.json has num_nextn_predict_layers={n}; the shards hold no tensor "
                f"of {layers}")
    return (f"multi-token prediction: {verb} {len(ckpt.mtp_tensors)} tensors of {layers} "
            f"({ckpt.mtp_bytes / 1e6:.1f} MB): {why}")


def _read_megatron_hf_config(src) -> tuple[str, dict]:
    """(absolute path, the hf_config.json written next to it) of a convert_hf_to_megatron directory."""
    src = os.path.abspath(os.fspath(src))
    cfg_path = os.path.join(src, MEGATRON_HF_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{src}: not a converted megatron checkpoint (no {MEGATRON_HF_CONFIG})")
    with open(cfg_path, encoding="utf-8") as f:
        return src, json.load(f)


def load_megatron_checkpoint(src, *, params_dtype=torch.float32):
    """(K2Config, hf config dict, TP = PP = EP = 1 model) loaded from a directory of convert_hf_to_megatron."""
    from megatron.core import dist_checkpointing

    src, hf_config = _read_megatron_hf_config(src)
    cfg = config_from_hf(hf_config)
    model = _megatron_ready(cfg, resolve_dtype(params_dtype))
    state = dist_checkpointing.load(model.sharded_state_dict(), src)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{src}: checkpoint does not fit the model: missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}")
    return cfg, hf_config, model


_MODEL_KEY = re.compile(r"^(embedding\.|decoder\.|output_layer\.)")


def expected_megatron_shapes(cfg: K2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the single-rank (global) megatron state dict of ``cfg`` and its shape: the HF
    shapes mapped through the adapter's hf_to_megatron on meta tensors (no memory)."""
    from k2_megatron.checkpoint.hf.adapter import hf_to_megatron
    from k2_megatron.checkpoint.hf.safetensors_io import expected_hf_shapes

    meta = {k: torch.empty(s, device="meta") for k, s in expected_hf_shapes(cfg).items()}
    return {k: tuple(v.shape) for k, v in hf_to_megatron(meta, cfg).items()}


def read_megatron_index(src) -> tuple[dict, K2Config, dict]:
    """(hf_config dict, K2Config, {name: (shape, dtype)} of the model tensors) of a megatron torch_dist
    directory, from its metadata only; raises CheckpointError for a directory that is not one, or whose
    model tensors are missing, unknown or of the wrong shape for hf_config.json. Optimizer state and other
    non-model entries are ignored."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    src, hf_config = _read_megatron_hf_config(src)
    try:
        cfg = config_from_hf(hf_config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{os.path.join(src, MEGATRON_HF_CONFIG)}: {exc}") from exc
    try:
        metadata = FileSystemReader(src).read_metadata()  # torch DCP's .metadata (a pickle: trusted input only)
    except Exception as exc:
        raise CheckpointError(f"{src}: not a readable torch_dist checkpoint: {exc}") from exc
    stored = {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and _MODEL_KEY.match(k) and not k.endswith("_extra_state")}
    expected = expected_megatron_shapes(cfg)
    missing = sorted(set(expected) - set(stored))
    unknown = sorted(set(stored) - set(expected))
    bad = [f"{k}: shape {list(stored[k][0])}, {MEGATRON_HF_CONFIG} implies {list(v)}"
           for k, v in expected.items() if k in stored and stored[k][0] != v]
    if missing or unknown or bad:
        raise CheckpointError(f"{src} does not match its {MEGATRON_HF_CONFIG}: missing {missing[:20]}, unknown "
                              f"{unknown[:20]}, wrong shapes {bad[:20]}")
    return hf_config, cfg, stored


def _load_torch_dist(src: str, entries: dict) -> dict:
    """{name: tensor} of some entries ({name: (shape, dtype)}) of a torch_dist checkpoint, read in one process
    without megatron (torch DCP reads only their byte ranges)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in entries.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(src), planner=DefaultLoadPlanner(allow_partial_load=True),
             no_dist=True)
    return state


def convert_megatron_to_hf(src, dst, *, dtype=None, fp8_export: bool = False, max_shard_size="5GB",
                           model_type: str | None = None, overwrite: bool = False,
                           progress: bool = False) -> ConversionStats:
    """megatron torch_dist directory (with hf_config.json, as convert_hf_to_megatron writes; saved by any
    TP / PP / EP layout) -> HF directory with per-expert tensor names (the release layout).

    Streaming, and without megatron or a model: the checkpoint's metadata is checked against hf_config.json
    first, then one layer at a time is read from the torch_dist files, mapped by the adapter's
    megatron_to_hf, and written. dtype: None keeps the stored dtype (the router bias stays fp32).
    """
    from k2_megatron.checkpoint.hf.adapter import megatron_to_hf
    from k2_megatron.checkpoint.hf.safetensors_io import expected_hf_shapes

    src, dst = _check_paths(src, dst)
    out_dtype = resolve_dtype(dtype)
    stats = ConversionStats("megatron->hf", src, dst)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        hf_config, cfg, stored = read_megatron_index(src)
        config = _output_config(hf_config, dtype=out_dtype, fp8=fp8_export, model_type=model_type)
        by_layer: dict[int | None, dict] = {}
        for k, v in stored.items():
            m = re.match(r"^decoder\.layers\.(\d+)\.", k)
            by_layer.setdefault(int(m.group(1)) if m else None, {})[k] = v
        expected_hf = set(expected_hf_shapes(cfg))
        written: set[str] = set()

        def nbytes(entries):
            return sum(math.prod(shape) * dt.itemsize for shape, dt in entries.values())

        with ShardedSafetensorsWriter(dst, max_shard_size=max_shard_size, overwrite=overwrite) as writer, \
                _progress(nbytes(stored), "megatron->hf", progress) as bar:
            for layer in sorted(by_layer, key=lambda x: -1 if x is None else x):
                entries = by_layer[layer]
                part = _load_torch_dist(src, entries)
                hf = megatron_to_hf(part, cfg, expert_layout="per_expert", strict=False)
                del part
                for name, t in hf.items():
                    stats.tensors += _emit(writer, name, t, dtype=out_dtype, fp8_export=fp8_export)
                    written.add(name)
                del hf
                stats.bytes_read += nbytes(entries)
                stats.largest_group_bytes = max(stats.largest_group_bytes, nbytes(entries))
                bar.update(nbytes(entries))
            if written != expected_hf:  # cannot happen after read_megatron_index; a guard on the adapter
                raise CheckpointError(f"{src}: conversion produced {sorted(written ^ expected_hf)[:20]} unexpectedly")
            writer.commit(config)
            stats.bytes_written = writer.bytes_written
    stats.seconds = time.perf_counter() - t0
    stats.peak_bytes, stats.peak_method = mem.peak_bytes, mem.method
    return stats


def validate_megatron_conversion(megatron_dir, hf_dir) -> tuple[bool, list[str]]:
    """Compare every tensor of an HF directory with the megatron checkpoint it came from, one layer at a time
    (megatron tensors mapped by megatron_to_hf), with validate_hf_conversion's tolerances."""
    from k2_megatron.checkpoint.hf.adapter import megatron_to_hf

    _, cfg, stored = read_megatron_index(megatron_dir)
    ckpt = HFCheckpoint(hf_dir)
    ckpt.validate()
    groups = {g[0]: g for g in ckpt.groups()}
    by_layer: dict[int | None, dict] = {}
    for k, v in stored.items():
        m = re.match(r"^decoder\.layers\.(\d+)\.", k)
        by_layer.setdefault(int(m.group(1)) if m else None, {})[k] = v
    lines, ok, worst, seen = [], True, (0.0, ""), set()
    for entries in by_layer.values():
        ref = megatron_to_hf(_load_torch_dist(os.fspath(megatron_dir), entries), cfg, expert_layout="per_expert",
                             strict=False)
        for name, ta in ref.items():
            seen.add(name)
            if name not in groups:
                ok = False
                lines.append(f"{name}: missing from {ckpt.path}")
                continue
            (_, tb), = ckpt.read_group(groups[name], dtype=torch.float32)
            problem, rel = _compare(name, ta, tb, ta.dtype, ckpt.tensors[name].dtype)
            if problem:
                ok = False
                lines.append(problem)
            worst = max(worst, (rel, name))
    extra = sorted(set(groups) - seen - set(ckpt.mtp_tensors))
    if ckpt.mtp_tensors:
        lines.append(_mtp_note(ckpt, "not compared", "not in a megatron checkpoint"))
    if extra:
        ok = False
        lines.append(f"tensors not in the megatron checkpoint: {extra[:20]}")
    lines.append(f"{len(seen)} tensors compared with the megatron checkpoint; largest max|diff| / max|src|: "
                 f"{worst[0]:.3g} ({worst[1]})")
    return ok, lines


def compare_logits(hf_dir, megatron_dir, *, seq: int = 16, batch: int = 2, seed: int = 0) -> float:
    """max |logits| difference between transformers' DeepseekV3ForCausalLM loaded from ``hf_dir`` and our
    megatron model from ``megatron_dir``, both computing in float32 (eager attention), on random tokens.

    The HF weights are first rounded the way the megatron checkpoint stores them (FP8 dequantised to, and
    other tensors cast to, its dtype from hf_config.json; the router bias fp32), so that both models hold
    the same values. For small models (both are built whole in memory)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    ckpt = HFCheckpoint(hf_dir)
    ckpt.validate()
    hf_cfg = dict(ckpt.config_dict)
    hf_cfg["model_type"] = "deepseek_v3"
    hf_cfg.pop("quantization_config", None)
    hf_config = DeepseekV3Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures",)})
    hf_config._attn_implementation = "eager"
    hf_model = DeepseekV3ForCausalLM(hf_config).float().eval()
    with open(os.path.join(megatron_dir, MEGATRON_HF_CONFIG), encoding="utf-8") as f:
        meg_config = json.load(f)
    meg_dtype = resolve_dtype(str(meg_config.get("dtype") or meg_config.get("torch_dtype") or "float32"))
    state = {}
    for group in ckpt.groups():
        if ckpt.is_mtp(group[0]):
            continue  # transformers' DeepseekV3ForCausalLM builds no multi-token-prediction layer
        for n, t in ckpt.read_group(group, dtype=meg_dtype if len(group) == 2 else None):
            state[n] = (t if _KEEP_FP32.search(n) else t.to(meg_dtype)).float()
    # transformers 5 keeps the experts fused in memory: build that layout from the per-expert tensors
    fused = _fuse_experts(state, ckpt.config) if ckpt.expert_layout == "per_expert" else state
    missing, unexpected = hf_model.load_state_dict(fused, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{hf_dir}: transformers model does not take the checkpoint: missing {missing[:20]}, "
                              f"unexpected {unexpected[:20]}")
    cfg, _, model = load_megatron_checkpoint(megatron_dir, params_dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    with torch.no_grad():
        ref = hf_model(tokens).logits
        pos = torch.arange(seq)[None].expand_as(tokens)
        out = model(tokens, pos, None)
    return (ref.float() - out.float()).abs().max().item()


def _fuse_experts(state: dict, cfg: K2Config) -> dict:
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        E = cfg.n_routed_experts
        out[p + "gate_up_proj"] = torch.stack([torch.cat([state[f"{p}{e}.gate_proj.weight"],
                                                          state[f"{p}{e}.up_proj.weight"]], 0) for e in range(E)])
        out[p + "down_proj"] = torch.stack([state[f"{p}{e}.down_proj.weight"] for e in range(E)])
    return out
