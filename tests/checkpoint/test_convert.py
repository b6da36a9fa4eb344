"""HF -> HF conversion (re-shard, re-dtype, FP8 dequantise / export), its memory bound and the CLI.

FP8 fixture: a K2-like config with K2's kv_a_proj_with_mqa (576 rows = 4 full 128-tiles + 64) and an odd
hidden size (200 = 128 + 72 columns), release-style random e4m3 weights and random full-precision float32
scales. Tolerances as in test_fp8: fp32 output == float64 reference rounded to fp32, exactly.

Memory: converting a ~40 MB, 11-shard fp32 checkpoint to bf16 (into one 20 MB output shard: the writer
streams each tensor to disk) must keep the peak resident memory (VmHWM above the start, in a fresh process)
below 3 x the largest tensor group (1 MiB: fp32 read, bf16 copy, slack) + 8 MiB of allocator / interpreter
slack = 11 MiB, a quarter of the checkpoint; the same measurement of a whole-model load sees >= the total.
"""

import json
import os

import pytest
import torch

from tests.helpers.checkpoint import (
    fp8_hf_config,
    leftovers,
    make_tensors,
    reference_dequant,
    snapshot,
    tiny_hf_config,
    write_hf_checkpoint,
)
from k2_megatron.checkpoint.convert import PeakMemory, compare_hf_checkpoints, convert_hf_to_hf, resolve_dtype
from k2_megatron.checkpoint.hf.fp8 import is_fp8_quantized_in_release
from k2_megatron.checkpoint.hf.safetensors_io import HFCheckpoint

from tests.helpers import REPO_ROOT

SCALE = "_scale_inv"


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _raw(path) -> dict:
    ckpt = HFCheckpoint(path)
    return {n: t for g in ckpt.groups() for n, t in ckpt.read_group(g, dequantize=False)}


@pytest.fixture(scope="module")
def fp8_src(tmp_path_factory):
    config = fp8_hf_config()
    tensors = make_tensors(config, fp8=True, seed=3)
    path = write_hf_checkpoint(tmp_path_factory.mktemp("fp8") / "src", config, tensors, shard_bytes=150_000)
    return path, tensors


@pytest.mark.slow
def test_fp8_import_matches_float64_reference(fp8_src, tmp_path):
    src, tensors = fp8_src
    ckpt = HFCheckpoint(src)
    ckpt.validate()
    assert ckpt.is_fp8 and ckpt.config.kv_lora_rank + ckpt.config.qk_rope_head_dim == 576
    stats = convert_hf_to_hf(src, tmp_path / "fp32", dtype="fp32", max_shard_size="300KB")
    out = _raw(tmp_path / "fp32")
    assert not any(n.endswith(SCALE) for n in out)
    quantised = [n for n in tensors if is_fp8_quantized_in_release(n)]
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in quantised and len(quantised) > 40
    for name in quantised:
        ref = reference_dequant(tensors[name], tensors[name + SCALE])
        assert out[name].dtype == torch.float32 and torch.equal(out[name], ref.to(torch.float32)), name
    for name, t in tensors.items():
        if name not in quantised and not name.endswith(SCALE):
            assert torch.equal(out[name], t.float()), name
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    assert stats.tensors == len(out) and stats.bytes_read == HFCheckpoint(src).total_bytes

    # default dtype: FP8 dequantises to bf16 (the fp32 result rounded), the rest keep their dtype
    convert_hf_to_hf(src, tmp_path / "keep")
    keep = _raw(tmp_path / "keep")
    for name in quantised:
        assert keep[name].dtype == torch.bfloat16 and torch.equal(keep[name], out[name].bfloat16())
    # bf16: everything bf16 except the router correction bias, fp32 in the release and in megatron
    convert_hf_to_hf(src, tmp_path / "bf16", dtype="bf16")
    bf16 = _raw(tmp_path / "bf16")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert bf16[bias].dtype == torch.float32 and torch.equal(bf16[bias], tensors[bias])
    assert all(t.dtype == torch.bfloat16 for n, t in bf16.items() if n != bias and "correction_bias" not in n)


@pytest.mark.slow
def test_fp8_export_passes_fp8_through_and_round_trips(fp8_src, tmp_path):
    src, tensors = fp8_src
    convert_hf_to_hf(src, tmp_path / "same", fp8_export=True, max_shard_size="1MB")
    same = _raw(tmp_path / "same")
    assert same.keys() == tensors.keys()
    assert all(torch.equal(_bits(same[k]), _bits(v)) for k, v in tensors.items())  # passed through unchanged
    config = json.loads((tmp_path / "same" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]

    # a BF16 / FP32 model exported to FP8 by our quantiser: dequantise to bf16 and export again -> same bits
    plain = tiny_hf_config()
    a = write_hf_checkpoint(tmp_path / "a", plain, make_tensors(plain, seed=5))
    convert_hf_to_hf(a, tmp_path / "b", fp8_export=True)
    convert_hf_to_hf(tmp_path / "b", tmp_path / "c", dtype="bf16")
    convert_hf_to_hf(tmp_path / "c", tmp_path / "d", fp8_export=True, max_shard_size="100KB")
    b, d = _raw(tmp_path / "b"), _raw(tmp_path / "d")
    assert b.keys() == d.keys() and sum(k.endswith(SCALE) for k in b) > 40
    fp8 = [k for k in b if b[k].dtype == torch.float8_e4m3fn]
    assert len(fp8) > 40 and all(torch.equal(_bits(b[k]), _bits(d[k])) and torch.equal(b[k + SCALE], d[k + SCALE])
                                 for k in fp8)
    others = [k for k in b if k not in fp8 and not k.endswith(SCALE)]  # fp32 in b, bf16 since c
    assert all(torch.equal(d[k], b[k] if k.endswith("correction_bias") else b[k].bfloat16()) for k in others)
    # FP8 error against the original fp32 weights: at most 16 scale units (half an e4m3 step at the top)
    diffs = compare_hf_checkpoints(a, tmp_path / "b")
    for name, diff in diffs.items():
        if is_fp8_quantized_in_release(name):
            assert diff <= 16 * b[name + SCALE].max().item(), name
        else:
            assert diff == 0.0, name


def test_reshard_keeps_every_byte_and_extra_files(tmp_path):
    config = tiny_hf_config("deepseek_v3")
    tensors = make_tensors(config, dtype=torch.bfloat16)
    src = write_hf_checkpoint(tmp_path / "src", config, tensors, single_file=True)
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"x": 1}')
    stats = convert_hf_to_hf(src, tmp_path / "out", max_shard_size="64KB", model_type="kimi_k2")
    out = _raw(tmp_path / "out")
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], v) and out[k].dtype == v.dtype
                                                 for k, v in tensors.items())
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"x": 1}'
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "kimi_k2"
    out_ckpt = HFCheckpoint(tmp_path / "out")
    per_file = {}
    for info in out_ckpt.tensors.values():
        per_file.setdefault(info.file, []).append(info.nbytes)
    assert all(sum(b) <= 64_000 or len(b) == 1 for b in per_file.values())  # 64KB = 64,000 bytes
    assert len(per_file) >= out_ckpt.total_bytes // 64_000 and stats.bytes_written > out_ckpt.total_bytes
    assert max(compare_hf_checkpoints(src, tmp_path / "out").values()) == 0.0


def test_resolve_dtype():
    assert resolve_dtype(None) is None and resolve_dtype("keep") is None
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("FP32") == torch.float32
    with pytest.raises(ValueError, match="'bf16', 'fp32' or 'keep'"):
        resolve_dtype("fp16")


_MEMORY_SCRIPT = r"""
import json, sys
import torch
from k2_megatron.checkpoint.convert import PeakMemory, convert_hf_to_hf
from k2_megatron.checkpoint.hf.safetensors_io import HFCheckpoint
src, warm, out = sys.argv[1:4]
convert_hf_to_hf(warm, out + "_warm")  # lazy imports and first-use allocations outside the measurement
stats = convert_hf_to_hf(src, out, dtype="bf16", max_shard_size="5GB")  # one output shard: nothing buffered
with PeakMemory() as control:  # the non-streaming way: every tensor in memory at once
    everything = dict(HFCheckpoint(src).iter_tensors(dtype=torch.float32))
    torch.stack([t.sum() for t in everything.values()])
print(json.dumps({"summary": stats.summary(), "peak": stats.peak_bytes, "method": stats.peak_method,
                  "largest": stats.largest_group_bytes, "read": stats.bytes_read, "control": control.peak_bytes}))
"""


@pytest.mark.slow
def test_streaming_peak_memory_is_bounded_by_the_largest_group(tmp_path):
    import subprocess
    import sys

    # ~40 MB of fp32 in 4 MB shards; the largest tensor is the 1 MiB embedding (and lm_head)
    config = tiny_hf_config(hidden_size=256, n_routed_experts=32, moe_intermediate_size=128, intermediate_size=512)
    tensors = make_tensors(config)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    src = write_hf_checkpoint(tmp_path / "src", config, tensors, shard_bytes=4 * 2**20)
    del tensors
    warm = tiny_hf_config()
    warm_src = write_hf_checkpoint(tmp_path / "w", warm, make_tensors(warm))
    # a fresh process: memory freed earlier in this one would hide growth from the resident-size measurement
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, src, warm_src, str(tmp_path / "out")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    largest = res["largest"]
    bound = 3 * largest + 8 * 2**20
    print(f"\n{res['summary']}\nsource {total / 2**20:.1f} MiB in {len(HFCheckpoint(src).files)} shards; "
          f"bound {bound / 2**20:.1f} MiB; all tensors at once: +{res['control'] / 2**20:.1f} MiB")
    assert total >= 36 * 2**20 and largest == 2**20 and len(HFCheckpoint(src).files) >= 9 and res["read"] == total
    assert res["method"].startswith("VmHWM") or res["method"].startswith("ru_maxrss")
    assert res["control"] >= 0.9 * total  # the measurement does see a whole-model load
    assert res["peak"] <= bound, res["summary"]
    # bf16 output; the 3 x 32 router bias entries stay fp32
    assert HFCheckpoint(tmp_path / "out").total_bytes == total // 2 + 3 * 32 * 2


def test_peak_memory_sees_an_allocation():
    # 64 MiB: above glibc's largest mmap threshold (32 MiB), so fresh pages even after earlier tests freed
    # memory that stays resident (why the streaming bound above is measured in a fresh process)
    with PeakMemory() as mem:
        x = torch.ones(64 * 2**20, dtype=torch.uint8)
        del x
    assert mem.peak_bytes >= 60 * 2**20, (mem.peak_bytes, mem.method)


@pytest.mark.slow
def test_cli(tmp_path, capsys):
    from k2_megatron.checkpoint import convert_cli as cli

    config = fp8_hf_config()
    src = write_hf_checkpoint(tmp_path / "src", config, make_tensors(config, fp8=True))
    assert cli.main(["hf-to-hf", "--src", src, "--dst", str(tmp_path / "o"), "--validate", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MB/s" in out and "peak memory" in out and "validate: " in out and "ok" in out
    assert cli.main(["hf-to-hf", "--src", str(tmp_path / "o"), "--dst", str(tmp_path / "q"), "--fp8-export",
                     "--validate", "--no-progress", "--max-shard-size", "200KB"]) == 0
    assert "tensors compared" in capsys.readouterr().out
    before = snapshot(tmp_path / "o")
    assert cli.main(["hf-to-hf", "--src", str(tmp_path / "q"), "--dst", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "output exists; pass overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path / "o") == before and leftovers(tmp_path, "o") == []
    with pytest.raises(SystemExit):
        cli.main(["sideways", "--src", src, "--dst", str(tmp_path / "z")])


@pytest.mark.slow
def test_tools_script_runs_with_a_progress_bar(tmp_path):
    import subprocess
    import sys

    config = tiny_hf_config()
    src = write_hf_checkpoint(tmp_path / "src", config, make_tensors(config))
    script = str(REPO_ROOT / "tools" / "convert_checkpoint.py")
    run = subprocess.run([sys.executable, script, "hf-to-hf", "--src", src, "--dst", str(tmp_path / "o"),
                          "--dtype", "bf16", "--validate"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "hf->hf: 100%" in run.stderr and "MB/s" in run.stdout and "tensors compared" in run.stdout
