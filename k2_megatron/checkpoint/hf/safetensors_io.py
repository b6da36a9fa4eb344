"""Streaming, validated reading and atomic, sharded writing of Hugging Face safetensors checkpoints.

Reader (``HFCheckpoint``): a directory with config.json and either model.safetensors.index.json + shards or
a single model.safetensors. Opening it parses config.json (model_type kimi_k2 or deepseek_v3) and every
shard's header (8-byte length + JSON: cheap, no tensor data is read) and checks the files against each other:
missing shard files, index entries naming tensors a shard does not hold, tensors no index entry names,
truncated or corrupt files (header length and JSON, byte ranges that must tile the data section exactly,
and the file size). ``validate()`` then checks the tensor names and shapes against ``expected_hf_shapes``
of the config, and the FP8 ``*_scale_inv`` siblings. ``iter_tensors`` reads one tensor group at a time
(a weight and its scale_inv together) with safetensors' ``safe_open``, dequantising FP8 on the fly; each
group opens and closes its shard so that no file mapping outlives the tensors taken from it.

Writer (``ShardedSafetensorsWriter``): writes each tensor's bytes into the open shard as it arrives (the
shard's header goes last, into space reserved at the start of the file), so it holds no tensors itself;
shards close at ``max_shard_size``; ``commit`` writes model.safetensors.index.json and config.json and moves
the finished directory into place.
Everything goes to a temporary directory next to the target; an existing target is only replaced on commit
(rename it away, rename the new one in, delete the old one), so a failure at any point leaves it untouched.

Only safetensors is read for Hugging Face weights: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch

from k2_megatron.checkpoint.errors import CheckpointError
from k2_megatron.checkpoint.hf.fp8 import (
    FP8_BLOCK_SIZE,
    SCALE_SUFFIX,
    dequantize_fp8_blockwise,
    fp8_scale_shape,
    is_fp8_quantized_in_release,
)
from k2_megatron.config.model import HF_MODEL_TYPES, K2Config, config_from_hf

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype strings <-> torch dtypes (the subset a K2 / DeepSeek-V3 checkpoint can hold)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_FLOAT_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str            # shard file name, relative to the checkpoint directory
    dtype: torch.dtype
    shape: tuple
    offset: int          # start of the tensor's bytes in the data section (for read ordering)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _short(items, n: int = 20) -> str:
    items = list(items)
    return repr(items[:n])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > n else "]")


# ----- safetensors headers -----

def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[torch.dtype, tuple, int]], dict]:
    """{name: (dtype, shape, data offset)}, metadata of a safetensors file, validated against its size.

    Raises CheckpointError (naming the file) for a file too short for its header, a header that is not
    JSON, unknown dtypes, byte ranges inconsistent with dtype x shape, ranges that do not tile the data
    section, and a data section shorter (truncated) or longer than the header says.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, truncated before the header)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file: header length {n} bytes, "
                                      f"file size {size} bytes")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    out, ranges = {}, []
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            kind = "unsupported dtype" if isinstance(exc, KeyError) and "dtype" in entry else "malformed entry"
            raise CheckpointError(f"{path}: tensor {name!r}: {kind} in the header: {entry!r}") from exc
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: byte range {[begin, end]} does not hold "
                                  f"{entry['dtype']} {list(shape)}")
        out[name] = (dtype, shape, begin)
        ranges.append((begin, end, name))
    ranges.sort()
    pos = 0
    for begin, end, name in ranges:
        if begin != pos:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} starts at byte {begin} "
                                  f"of the data section, expected {pos} (holes or overlaps)")
        pos = end
    data = size - 8 - n
    if pos > data:
        raise CheckpointError(f"{path}: truncated safetensors file: the header needs {pos} data bytes, the file "
                              f"has {data} ({size} bytes in all)")
    if pos < data:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data - pos} bytes after the last tensor")
    return out, metadata


# ----- expected tensors of a config -----

def expected_hf_shapes(cfg: K2Config, *, expert_layout: str = "per_expert") -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of a DeepSeek-V3 / K2 model of ``cfg`` and its shape (no FP8 scales).

    expert_layout: "per_expert" (mlp.experts.e.{gate,up,down}_proj.weight: the release files and what
    transformers 5 saves) or "fused" (mlp.experts.gate_up_proj [E, 2F, H] / down_proj [E, H, F]: the
    transformers 5 in-memory layout).
    """
    if expert_layout not in ("per_expert", "fused"):
        raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
    H, V = cfg.hidden_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        out.update(_decoder_layer_shapes(cfg, i, expert_layout))
    return out


def expected_mtp_shapes(cfg: K2Config, num_mtp_layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the multi-token-prediction layers of a DeepSeek-V3 release
    (``num_nextn_predict_layers``): layers num_hidden_layers, num_hidden_layers + 1, ..., each an MoE decoder
    layer plus its own embedding, enorm/hnorm, eh_proj [H, 2H] and shared_head (norm, head); per-expert names.
    The model built here has no MTP layer: converters skip (hf -> megatron) or carry (hf -> hf) these tensors."""
    H, V = cfg.hidden_size, cfg.vocab_size
    out = {}
    for i in range(cfg.num_hidden_layers, cfg.num_hidden_layers + num_mtp_layers):
        p = f"model.layers.{i}."
        out.update(_decoder_layer_shapes(cfg, i, "per_expert"))
        out.update({p + "embed_tokens.weight": (V, H), p + "enorm.weight": (H,), p + "hnorm.weight": (H,),
                    p + "eh_proj.weight": (H, 2 * H), p + "shared_head.norm.weight": (H,),
                    p + "shared_head.head.weight": (V, H)})
    return out


def _decoder_layer_shapes(cfg: K2Config, i: int, expert_layout: str) -> dict[str, tuple[int, ...]]:
    H, n = cfg.hidden_size, cfg.num_attention_heads
    F, E = cfg.moe_intermediate_size, cfg.n_routed_experts
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out = {}
    if cfg.q_lora_rank is not None:
        out[a + "q_a_proj.weight"] = (cfg.q_lora_rank, H)
        out[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        out[a + "q_b_proj.weight"] = (n * cfg.qk_head_dim, cfg.q_lora_rank)
    else:
        out[a + "q_proj.weight"] = (n * cfg.qk_head_dim, H)
    out[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
    out[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    out[a + "kv_b_proj.weight"] = (n * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    out[a + "o_proj.weight"] = (H, n * cfg.v_head_dim)
    out[p + "input_layernorm.weight"] = (H,)
    out[p + "post_attention_layernorm.weight"] = (H,)
    m = p + "mlp."
    if i < cfg.first_k_dense_replace:
        I = cfg.intermediate_size
        out.update({m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H), m + "down_proj.weight": (H, I)})
        return out
    out[m + "gate.weight"] = (E, H)
    out[m + "gate.e_score_correction_bias"] = (E,)
    if expert_layout == "fused":
        out[m + "experts.gate_up_proj"] = (E, 2 * F, H)
        out[m + "experts.down_proj"] = (E, H, F)
    else:
        for e in range(E):
            x = f"{m}experts.{e}."
            out.update({x + "gate_proj.weight": (F, H), x + "up_proj.weight": (F, H),
                        x + "down_proj.weight": (H, F)})
    if cfg.n_shared_experts:
        S = F * cfg.n_shared_experts
        s = m + "shared_experts."
        out.update({s + "gate_proj.weight": (S, H), s + "up_proj.weight": (S, H), s + "down_proj.weight": (H, S)})
    return out


# ----- reader -----

def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing {what}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


class HFCheckpoint:
    """A Hugging Face DeepSeek-V3 / Kimi K2 checkpoint directory, read lazily (headers only until iterated).

    Attributes: path, config_dict (config.json as read), config (K2Config), tensors ({name: TensorInfo}),
    files (shard file names), expert_layout ("per_expert" or "fused"), block_size (FP8 block, 128).
    Structural problems raise CheckpointError here; ``validate()`` adds the checks against the config.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint directory)")
        cfg_path = os.path.join(self.path, CONFIG_NAME)
        self.config_dict = _load_json(cfg_path, "config.json")
        model_type = self.config_dict.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise CheckpointError(f"{cfg_path}: unsupported model_type {model_type!r}; this converter reads "
                                  f"{' and '.join(HF_MODEL_TYPES)} checkpoints")
        try:
            self.config = config_from_hf(self.config_dict)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{cfg_path}: {exc}") from exc
        qc = self.config_dict.get("quantization_config") or {}
        block = qc.get("weight_block_size", [FP8_BLOCK_SIZE, FP8_BLOCK_SIZE]) if isinstance(qc, dict) else None
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and block[0] == block[1]
                and isinstance(block[0], int) and block[0] > 0):
            raise CheckpointError(f"{cfg_path}: quantization_config.weight_block_size={block!r}: expected two equal "
                                  "positive ints (square blocks, [128, 128] in the release)")
        self.block_size = int(block[0])

        index_path = os.path.join(self.path, INDEX_NAME)
        if os.path.exists(index_path):
            index = _load_json(index_path, "safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
            self.index_path = index_path
        elif os.path.exists(os.path.join(self.path, SINGLE_NAME)):
            weight_map = None
            self.index_path = None
        else:
            raise CheckpointError(f"{self.path}: no {INDEX_NAME} and no {SINGLE_NAME}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        bad = [f for f in files if os.path.basename(f) != f or not f.endswith(".safetensors")]
        if bad:
            raise CheckpointError(f"{index_path}: shard names must be plain *.safetensors file names, "
                                  f"got {_short(bad)}")
        missing = [f for f in files if not os.path.isfile(os.path.join(self.path, f))]
        if missing:
            raise CheckpointError(f"{self.path}: missing shard files {_short(missing)} (listed in {INDEX_NAME})")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            header, _ = read_safetensors_header(os.path.join(self.path, f))
            for name, (dtype, shape, offset) in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is in both {self.tensors[name].file} and {f}")
                self.tensors[name] = TensorInfo(name, f, dtype, shape, offset)
        if weight_map is not None:
            absent = [f"{k} -> {v}" for k, v in weight_map.items()
                      if k not in self.tensors or self.tensors[k].file != v]
            if absent:
                raise CheckpointError(f"{index_path}: entries point to tensors their shard does not hold: "
                                      f"{_short(absent)}")
            unlisted = sorted(set(self.tensors) - set(weight_map))
            if unlisted:
                raise CheckpointError(f"{index_path}: shards hold tensors the index does not list: "
                                      f"{_short(f'{k} in {self.tensors[k].file}' for k in unlisted)}")
        self.expert_layout = ("fused" if any(k.endswith("mlp.experts.gate_up_proj") for k in self.tensors)
                              else "per_expert")
        # multi-token-prediction layers (DeepSeek-V3 releases: 1); config_from_hf checked the count
        self.mtp_shapes = expected_mtp_shapes(self.config, self.config_dict.get("num_nextn_predict_layers") or 0)
        self.mtp_tensors = sorted(k for k in self.tensors if self.is_mtp(k))

    # --- properties ---
    @property
    def is_fp8(self) -> bool:
        return any(t.dtype == torch.float8_e4m3fn for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def is_mtp(self, name: str) -> bool:
        """Whether ``name`` (or the weight a ``*_scale_inv`` belongs to) is a multi-token-prediction tensor."""
        base = name[:-len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
        return base in self.mtp_shapes

    @property
    def mtp_bytes(self) -> int:
        return sum(self.tensors[k].nbytes for k in self.mtp_tensors)

    def _where(self, name: str) -> str:
        return f"{os.path.join(self.path, self.tensors[name].file)}: tensor {name!r}"

    # --- validation against the config ---
    def validate(self) -> None:
        """Raise CheckpointError listing every tensor that is missing, unknown, of the wrong shape or dtype,
        or an FP8 weight without (or with a bad) scale_inv, against ``expected_hf_shapes(self.config)``.
        Multi-token-prediction tensors are optional (transformers saves none); those present are checked too."""
        required = expected_hf_shapes(self.config, expert_layout=self.expert_layout)
        expected = {**required, **{k: v for k, v in self.mtp_shapes.items() if k in self.tensors}}
        problems = []
        missing = [k for k in required if k not in self.tensors]
        if missing:
            problems.append(f"missing tensors {_short(missing)}")
        unknown = [k for k in self.tensors if k not in expected
                   and not (k.endswith(SCALE_SUFFIX) and k[:-len(SCALE_SUFFIX)] in expected)]
        if unknown:
            problems.append(f"unknown tensors (not in a {self.config_dict.get('model_type')} model of this "
                            f"config.json) {_short(f'{k} in {self.tensors[k].file}' for k in unknown)}")
        bad = []
        for name, want in expected.items():
            info = self.tensors.get(name)
            if info is None:
                continue
            if info.shape != want:
                bad.append(f"{self._where(name)}: shape {list(info.shape)}, config.json implies {list(want)}")
                continue
            scale = self.tensors.get(name + SCALE_SUFFIX)
            if info.dtype == torch.float8_e4m3fn:
                if not is_fp8_quantized_in_release(name):
                    bad.append(f"{self._where(name)}: float8_e4m3fn, but this tensor is never FP8-quantised")
                elif scale is None:
                    bad.append(f"{self._where(name)}: float8_e4m3fn without its {name + SCALE_SUFFIX}")
                else:
                    want_s = fp8_scale_shape(info.shape, self.block_size)
                    if scale.dtype != torch.float32 or scale.shape != want_s:
                        bad.append(f"{self._where(name + SCALE_SUFFIX)}: expected float32 {list(want_s)} "
                                   f"(ceil({list(info.shape)} / {self.block_size})), got {scale.dtype} "
                                   f"{list(scale.shape)}")
            elif info.dtype not in _FLOAT_WEIGHT_DTYPES:
                bad.append(f"{self._where(name)}: dtype {info.dtype} is not a weight dtype")
            elif scale is not None:
                bad.append(f"{self._where(name + SCALE_SUFFIX)}: a scale for a tensor that is not FP8 ({info.dtype})")
        if bad:
            problems.append("; ".join(bad[:20]) + (f"; ... ({len(bad)} in all)" if len(bad) > 20 else ""))
        if problems:
            raise CheckpointError(f"{self.path} does not match its config.json: " + "; ".join(problems))

    # --- streaming ---
    def groups(self) -> list[list[str]]:
        """Read groups in file order: [weight, weight_scale_inv] for FP8 weights, [name] otherwise."""
        out = []
        for name, info in sorted(self.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset)):
            if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.tensors:
                continue  # read with its weight
            scale = name + SCALE_SUFFIX
            out.append([name, scale] if scale in self.tensors else [name])
        return out

    def group_bytes(self, group: list[str]) -> int:
        return sum(self.tensors[n].nbytes for n in group)

    def read_group(self, group: list[str], *, dtype: torch.dtype | None = None,
                   dequantize: bool = True) -> list[tuple[str, torch.Tensor]]:
        """The tensors of one group; an FP8 weight comes back dequantised (to ``dtype``, default bf16) unless
        ``dequantize=False``, in which case it comes back with its scale_inv. ``dtype`` casts float tensors."""
        from safetensors import safe_open

        raw = {}
        for name in group:
            info = self.tensors[name]
            path = os.path.join(self.path, info.file)
            try:
                with safe_open(path, framework="pt") as f:
                    raw[name] = f.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: tensor {name!r}: cannot read: {exc}") from exc
        name = group[0]
        if len(group) == 2 and dequantize:
            w = dequantize_fp8_blockwise(raw[name], raw[group[1]], dtype=dtype or torch.bfloat16,
                                         block_size=self.block_size, name=self._where(name))
            return [(name, w)]
        out = []
        for n in group:
            t = raw[n]
            if dtype is not None and t.is_floating_point() and t.dtype != torch.float8_e4m3fn \
                    and not n.endswith(SCALE_SUFFIX) and t.dtype != dtype:
                t = t.to(dtype)
            out.append((n, t))
        return out

    def iter_tensors(self, *, dtype: torch.dtype | None = None, dequantize: bool = True
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, one group in memory at a time (see ``read_group``)."""
        for group in self.groups():
            yield from self.read_group(group, dtype=dtype, dequantize=dequantize)


# ----- atomic output directories -----

def make_staging_dir(out_dir: str, *, overwrite: bool = False) -> str:
    """A fresh temporary directory next to ``out_dir`` (same file system, so the final rename is atomic).

    Refuses (CheckpointError) an existing ``out_dir`` unless ``overwrite``; nothing of it is touched here.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        if not overwrite:
            raise CheckpointError(f"{out_dir}: output exists; pass overwrite=True (--overwrite) to replace it")
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"{out_dir}: output exists and is not a directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    return staging


def move_into_place(staging_dir: str, out_dir: str) -> None:
    """Rename a finished ``staging_dir`` to ``out_dir``. An existing ``out_dir`` is renamed away first and
    deleted only after the new one is in place (restored if the rename fails)."""
    out_dir = os.path.abspath(out_dir)
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(staging_dir, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----- writer -----

def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal for KB/MB/GB, binary for KiB/MiB/GiB)."""
    if isinstance(value, int):
        return value
    s = value.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[:-len(unit)]) * mult)
    return int(s)


class ShardedSafetensorsWriter:
    """Sharded safetensors + index.json + config.json, written atomically into ``out_dir``.

    with ShardedSafetensorsWriter(out_dir, max_shard_size="5GB", overwrite=False) as w:
        w.add(name, tensor) ...
        w.commit(config_dict)          # without commit (an exception), nothing of out_dir changes

    Each tensor's bytes go to the open shard file as soon as it is added, so the writer keeps no tensor in
    memory: the caller's peak is its own largest tensor group. The shard's header is written last, into
    space reserved at the start of the file (``header_reserve`` bytes, space-padded JSON as the format
    allows); a shard closes when its data would pass ``max_shard_size`` (a larger tensor gets a shard of
    its own) or its header would outgrow the reserve.
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_shard_size: str | int = "5GB", overwrite: bool = False,
                 header_reserve: int | None = None):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.max_shard_size = parse_size(max_shard_size)
        if self.max_shard_size <= 0:
            raise ValueError(f"max_shard_size must be > 0, got {max_shard_size!r}")
        if header_reserve is None:  # ~100 bytes per header entry: 256 KiB hold ~2500 tensors
            header_reserve = min(max(self.max_shard_size // 4096, 4096), 256 * 1024)
        self.header_reserve = -(-int(header_reserve) // 8) * 8  # the data section starts 8-byte aligned
        self.tmp_dir = make_staging_dir(self.out_dir, overwrite=overwrite)
        self._file = None
        self._entries: dict[str, dict] = {}
        self._header_bytes = 0
        self._pos = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.bytes_written = 0
        self.total_tensor_bytes = 0
        self._done = False

    _METADATA = {"__metadata__": {"format": "pt"}}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._done:
            raise RuntimeError("ShardedSafetensorsWriter: add() after commit/abort")
        if name in self._names:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} written twice")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in TORCH_TO_ST:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r}: dtype {tensor.dtype} has no safetensors "
                                  "equivalent")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        entry = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape)}
        entry_bytes = len(json.dumps({name: {**entry, "data_offsets": [10**15, 10**15]}}, separators=(",", ":")))
        if entry_bytes + len(json.dumps(self._METADATA)) > self.header_reserve:
            raise CheckpointError(f"tensor {name!r}: its header entry ({entry_bytes} bytes) does not fit the "
                                  f"{self.header_reserve}-byte header reserve")
        if self._file is not None and self._entries and (
                self._pos + nbytes > self.max_shard_size
                or self._header_bytes + entry_bytes + len(json.dumps(self._METADATA)) > self.header_reserve):
            self._close_shard()
        if self._file is None:
            self._open_shard()
        if nbytes:
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries[name] = {**entry, "data_offsets": [self._pos, self._pos + nbytes]}
        self._header_bytes += entry_bytes
        self._pos += nbytes
        self._names.add(name)
        self.total_tensor_bytes += nbytes

    def _open_shard(self) -> None:
        path = os.path.join(self.tmp_dir, f"shard-{len(self._shards):06d}.tmp")
        self._file = open(path, "wb")
        self._file.seek(8 + self.header_reserve)
        self._entries, self._header_bytes, self._pos = {}, 0, 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        raw = json.dumps({**self._entries, **self._METADATA}, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.header_reserve:  # guarded by add(); a bug if reached
            raise RuntimeError(f"safetensors header of {len(raw)} bytes exceeds its reserve {self.header_reserve}")
        self._file.seek(0)
        self._file.write(self.header_reserve.to_bytes(8, "little"))
        self._file.write(raw + b" " * (self.header_reserve - len(raw)))
        self._file.close()
        self._file = None
        self.bytes_written += 8 + self.header_reserve + self._pos
        self._shards.append(list(self._entries))
        self._entries, self._header_bytes, self._pos = {}, 0, 0

    def commit(self, config: dict, extra_files: dict[str, str] | None = None) -> str:
        """Write the last shard, the index and config.json (and ``extra_files``: {name: source path} copied
        in), then move the directory into place. Returns out_dir."""
        if self._done:
            raise RuntimeError("ShardedSafetensorsWriter: commit() twice or after abort()")
        try:
            self._close_shard()
            n = len(self._shards)
            names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            weight_map = {}
            for i, (shard, fname) in enumerate(zip(self._shards, names)):
                os.rename(os.path.join(self.tmp_dir, f"shard-{i:06d}.tmp"), os.path.join(self.tmp_dir, fname))
                weight_map.update({k: fname for k in shard})
            if n != 1:
                index = {"metadata": {"total_size": self.total_tensor_bytes},
                         "weight_map": dict(sorted(weight_map.items()))}
                with open(os.path.join(self.tmp_dir, INDEX_NAME), "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
            for fname, src in (extra_files or {}).items():
                shutil.copyfile(src, os.path.join(self.tmp_dir, fname))
            with open(os.path.join(self.tmp_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
            move_into_place(self.tmp_dir, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far (the target directory was never touched)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._done = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._done:
            self.abort()
        return False
