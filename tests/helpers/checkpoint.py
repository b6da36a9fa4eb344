"""Shared helpers of the checkpoint tests (not collected): synthetic Hugging Face K2 checkpoints written with
safetensors' own writer (independent of ours), FP8 release-style fixtures, directory snapshots."""

from __future__ import annotations

import json
import os
import pickle

import torch
from safetensors.torch import save_file

from k2_megatron.checkpoint.hf.fp8 import fp8_scale_shape, is_fp8_quantized_in_release
from k2_megatron.checkpoint.hf.safetensors_io import expected_hf_shapes
from k2_megatron.config import config_from_hf, config_to_hf, get_preset


def tiny_hf_config(model_type: str = "kimi_k2", **overrides) -> dict:
    return config_to_hf(get_preset("k2-tiny", **overrides), model_type)


def fp8_hf_config(**overrides) -> dict:
    """k2-tiny with K2's kv_a_proj_with_mqa (512 + 64 = 576 rows: 4 full 128-tiles and one of 64) and an
    odd hidden size (200 columns: one full tile and one of 72), FP8 quantization_config as in the release."""
    cfg = tiny_hf_config(kv_lora_rank=512, qk_rope_head_dim=64, hidden_size=200, **overrides)
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    return cfg


def decode_e4m3_float64(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bit patterns decoded by hand in float64: sign, 4-bit exponent (bias 7), 3-bit mantissa,
    subnormals at exponent 0 (NaN patterns are not treated)."""
    bits = q.view(torch.uint8).to(torch.int64)
    sign = torch.where(bits >= 128, -1.0, 1.0).to(torch.float64)
    exp = (bits >> 3) & 0xF
    man = (bits & 0x7).to(torch.float64)
    normal = (1 + man / 8) * torch.pow(2.0, (exp - 7).to(torch.float64))
    subnormal = man / 8 * 2.0 ** -6
    return sign * torch.where(exp == 0, subnormal, normal)


def reference_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """w[i, j] = q[i, j] * s[i // block, j // block] in float64, by index gathering."""
    rows = torch.arange(q.shape[0]) // block
    cols = torch.arange(q.shape[1]) // block
    return decode_e4m3_float64(q) * s.to(torch.float64)[rows][:, cols]


def random_fp8(shape, g) -> torch.Tensor:
    """Every finite e4m3 bit pattern (0x7F / 0xFF are NaN) with equal probability."""
    bits = torch.randint(0, 254, shape, generator=g, dtype=torch.int64)
    return torch.where(bits >= 127, bits + 1, bits).to(torch.uint8).view(torch.float8_e4m3fn)


def make_tensors(config: dict, *, dtype=torch.float32, fp8: bool = False, seed: int = 0) -> dict:
    """Random tensors of every HF name of ``config`` (per-expert layout); FP8: release-quantised weights
    as random finite e4m3 patterns with random full-precision float32 scales, like the release."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_hf_shapes(config_from_hf(config)).items():
        if fp8 and is_fp8_quantized_in_release(name):
            out[name] = random_fp8(shape, g)
            s_shape = fp8_scale_shape(shape)
            out[name + "_scale_inv"] = ((1 + torch.rand(s_shape, generator=g)) *
                                        torch.pow(2.0, torch.randint(-12, 0, s_shape, generator=g).float()))
        elif name.endswith("e_score_correction_bias"):
            out[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = (0.05 * torch.randn(shape, generator=g)).to(dtype)
    return out


def write_hf_checkpoint(path, config: dict, tensors: dict, *, shard_bytes: int | None = 200_000,
                        single_file: bool = False) -> str:
    """config.json + shards (greedy, ~shard_bytes each, in name order) + index, via safetensors.save_file."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if single_file:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return str(path)
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                   "weight_map": weight_map}, f, indent=2)
    return str(path)


def snapshot(path) -> dict:
    """{relative path: bytes (files) or None (directories)} of a directory tree, for byte-for-byte checks."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def leftovers(parent, name: str) -> list[str]:
    """Temporary directories of an output ``name`` left in ``parent``."""
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


class RunsCode:
    """Pickles as a call of os.system: unpickling it touches ``path`` (what a malicious checkpoint would hold)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def plant_code_in_dcp_metadata(directory, marker) -> None:
    """Rewrites torch DCP's ``.metadata`` of ``directory`` so that unpickling it touches ``marker``."""
    path = os.path.join(directory, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)  # our own checkpoint: trusted here
    metadata.storage_meta.modules = [RunsCode(marker)]
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


def gated_writer(gate: str, *, only: str | None = None, timeout: float | None = None):
    """A replacement for k2_megatron.checkpoint.writer._write_then_hash (install it before the save forks its
    writer) whose writers wait for the file ``gate`` before writing (once set up to die with the trainer).
    only: hold only the saves whose temporary directory ends with it (e.g. "0000003"); timeout: seconds after which
    a held writer raises instead (a writer that never runs in parallel with training then fails its save)."""
    import time

    from k2_megatron.checkpoint import writer

    original = writer._write_then_hash

    def gated(write, directory, *rest):
        def held(*args):
            deadline = None if timeout is None else time.monotonic() + timeout
            while not os.path.exists(gate):
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the writer of {directory} waited {timeout} s for {gate}")
                time.sleep(0.05)
            write(*args)

        original(held if only is None or directory.endswith(only) else write, directory, *rest)

    return gated
