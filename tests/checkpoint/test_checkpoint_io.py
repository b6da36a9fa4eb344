"""Streaming safetensors IO of Hugging Face K2 / DeepSeek-V3 checkpoints: expected shapes from config.json,
reading what transformers writes, the sharded atomic writer, and every bad input (a clear error naming the
file / tensor, raised before anything is written, with a pre-existing output directory left byte for byte
as it was)."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers.checkpoint import (
    fp8_hf_config,
    leftovers,
    make_tensors,
    snapshot,
    tiny_hf_config,
    write_hf_checkpoint,
)
from k2_megatron.checkpoint.convert import convert_hf_to_hf
from k2_megatron.checkpoint.errors import CheckpointError
from k2_megatron.checkpoint.hf.safetensors_io import (
    HFCheckpoint,
    ShardedSafetensorsWriter,
    expected_hf_shapes,
    parse_size,
    read_safetensors_header,
)
from k2_megatron.config import get_preset


def test_expected_shapes_of_the_full_k2():
    cfg = get_preset("k2")
    shapes = expected_hf_shapes(cfg)
    # independent count: the config's own parameter count (norms and router bias included)
    assert sum(math.prod(s) for s in shapes.values()) == cfg.num_parameters()[0]
    per_attn = 9  # q_a, q_a_layernorm, q_b, kv_a, kv_a_layernorm, kv_b, o, input / post-attention norms
    assert len(shapes) == 3 + 61 * per_attn + 3 + 60 * (2 + 384 * 3 + 3)
    L = "model.layers.7."
    assert shapes[L + "self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert shapes[L + "self_attn.q_b_proj.weight"] == (64 * 192, 1536)
    assert shapes[L + "self_attn.kv_b_proj.weight"] == (64 * 256, 512)
    assert shapes[L + "self_attn.o_proj.weight"] == (7168, 64 * 128)
    assert shapes[L + "mlp.experts.383.down_proj.weight"] == (7168, 2048)
    assert shapes[L + "mlp.gate.e_score_correction_bias"] == (384,)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (18432, 7168)
    fused = expected_hf_shapes(cfg, expert_layout="fused")
    assert fused[L + "mlp.experts.gate_up_proj"] == (384, 4096, 7168)
    assert sum(math.prod(s) for s in fused.values()) == cfg.num_parameters()[0]
    no_q_lora = expected_hf_shapes(get_preset("k2-tiny", q_lora_rank=None))
    assert no_q_lora["model.layers.0.self_attn.q_proj.weight"] == (4 * 24, 64)
    with pytest.raises(ValueError, match="expert_layout"):
        expected_hf_shapes(cfg, expert_layout="x")


@pytest.mark.slow
def test_reads_what_transformers_save_pretrained_writes(tmp_path):
    from tests.helpers.model import k2_like_tiny_config, make_hf_model

    cfg = k2_like_tiny_config()
    model = make_hf_model(cfg, seed=1)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="200KB")
    ckpt = HFCheckpoint(tmp_path / "hf")
    ckpt.validate()
    assert len(ckpt.files) > 1 and ckpt.expert_layout == "per_expert" and not ckpt.is_fp8
    read = dict(ckpt.iter_tensors())
    # transformers 5 fuses the experts in memory and writes them per expert: split for the comparison
    ref = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[:-len("gate_up_proj")]
            for e in range(v.shape[0]):
                ref[f"{p}{e}.gate_proj.weight"], ref[f"{p}{e}.up_proj.weight"] = v[e].chunk(2, 0)
        elif k.endswith("mlp.experts.down_proj"):
            p = k[:-len("down_proj")]
            for e in range(v.shape[0]):
                ref[f"{p}{e}.down_proj.weight"] = v[e]
        else:
            ref[k] = v
    assert sorted(read) == sorted(ref)
    for k, v in ref.items():
        assert read[k].dtype == v.dtype and torch.equal(read[k], v), k


def test_single_file_and_sharded_layouts_read_the_same(tmp_path):
    config = tiny_hf_config()
    tensors = make_tensors(config, dtype=torch.bfloat16)
    a = HFCheckpoint(write_hf_checkpoint(tmp_path / "a", config, tensors, single_file=True))
    b = HFCheckpoint(write_hf_checkpoint(tmp_path / "b", config, tensors, shard_bytes=50_000))
    a.validate()
    b.validate()
    assert a.files == ["model.safetensors"] and len(b.files) > 5
    ra, rb = dict(a.iter_tensors()), dict(b.iter_tensors())
    assert ra.keys() == rb.keys() == tensors.keys()
    assert all(torch.equal(ra[k], tensors[k]) and torch.equal(rb[k], tensors[k]) for k in tensors)
    assert a.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_header_parser_matches_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(0, 4), "c": torch.tensor(2.0),
               "d": torch.zeros(7).to(torch.float8_e4m3fn), "e": torch.zeros(2, dtype=torch.int64)}
    save_file(tensors, p, metadata={"k": "v"})
    header, meta = read_safetensors_header(p)
    assert meta == {"k": "v"}
    assert {k: (v[0], v[1]) for k, v in header.items()} == {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    with open(p, "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: corrupt safetensors file: 3 bytes after"):
        read_safetensors_header(p)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 10**5
    assert parse_size(" 1.5 MB") == 1_500_000 and parse_size("123") == 123 and parse_size(7) == 7


def test_writer_shards_indexes_and_reads_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(100 + 37 * i, generator=g) for i in range(20)}
    tensors.update({"big": torch.randn(40_000, generator=g),  # larger than a shard: alone in its own
                    "fp8": torch.randn(33, 17, generator=g).to(torch.float8_e4m3fn),
                    "bf16": torch.randn(3, 3, generator=g).bfloat16(), "empty": torch.zeros(0, 5),
                    "scalar": torch.tensor(3.5), "flag": torch.tensor([True, False]),
                    "strided": torch.randn(8, 6, generator=g).t()})
    max_shard = 20_000
    with ShardedSafetensorsWriter(tmp_path / "out", max_shard_size=max_shard) as w:
        for k, v in tensors.items():
            w.add(k, v)
        w.commit({"model_type": "kimi_k2", "x": 1})
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert json.loads((out / "config.json").read_text()) == {"model_type": "kimi_k2", "x": 1}
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    assert sorted(os.listdir(out)) == sorted(files + ["config.json", "model.safetensors.index.json"])
    for f in files:
        header, _ = read_safetensors_header(out / f)
        nbytes = sum(math.prod(s) * d.itemsize for d, s, _ in header.values())
        assert nbytes <= max_shard or len(header) == 1, (f, nbytes)
        with safe_open(out / f, framework="pt") as h:
            for k in h.keys():
                assert index["weight_map"][k] == f
                t = h.get_tensor(k)
                assert t.dtype == tensors[k].dtype and t.shape == tensors[k].shape
                assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                                   tensors[k].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else tensors[k])
    assert oct(os.stat(out).st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    assert leftovers(tmp_path, "out") == []
    # one shard: model.safetensors and no index (the transformers convention)
    with ShardedSafetensorsWriter(tmp_path / "one", max_shard_size="1GB") as w:
        w.add("a", torch.ones(3))
        w.commit({})
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]


def test_writer_streams_and_closes_shards_when_the_header_reserve_is_full(tmp_path):
    tensors = {f"model.layers.{i}.input_layernorm.weight": torch.full((3,), float(i)) for i in range(30)}
    with ShardedSafetensorsWriter(tmp_path / "out", max_shard_size="1GB", header_reserve=400) as w:
        for k, v in tensors.items():
            w.add(k, v)
        assert w._file is not None and w.total_tensor_bytes == 30 * 12  # written through, nothing buffered
        with pytest.raises(CheckpointError, match="does not fit the 400-byte header reserve"):
            w.add("x" * 400, torch.ones(1))
        w.commit({})
    ckpt_files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert len(ckpt_files) >= 5  # ~90 bytes per entry: 3-4 entries per 400-byte header
    seen = {}
    for f in ckpt_files:
        n_tensors = len(read_safetensors_header(tmp_path / "out" / f)[0])
        assert os.path.getsize(tmp_path / "out" / f) == 8 + 400 + 12 * n_tensors
        with safe_open(tmp_path / "out" / f, framework="pt") as h:  # the space-padded header is valid safetensors
            seen.update({k: h.get_tensor(k) for k in h.keys()})
    assert seen.keys() == tensors.keys() and all(torch.equal(seen[k], v) for k, v in tensors.items())


def test_writer_refuses_existing_output_and_replaces_it_only_on_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(CheckpointError, match="output exists; pass overwrite"):
        ShardedSafetensorsWriter(out)
    w = ShardedSafetensorsWriter(out, overwrite=True)
    w.add("a", torch.ones(2))
    with pytest.raises(CheckpointError, match="'a' written twice"):
        w.add("a", torch.ones(2))
    assert snapshot(out) == {"old.txt": b"old"}  # nothing visible before commit
    w.commit({})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert leftovers(tmp_path, "out") == []
    with ShardedSafetensorsWriter(tmp_path / "x") as w:  # no commit: nothing appears, nothing left behind
        w.add("a", torch.ones(2))
    assert not (tmp_path / "x").exists() and leftovers(tmp_path, "x") == []


# ----- bad inputs: each raises before anything is written; the existing output stays byte for byte -----

def _rewrite_index(src, change):
    p = os.path.join(src, "model.safetensors.index.json")
    index = json.load(open(p))
    change(index)
    json.dump(index, open(p, "w"))


def _rewrite_config(src, change):
    p = os.path.join(src, "config.json")
    config = json.load(open(p))
    change(config)
    json.dump(config, open(p, "w"))


def _shard_of(src, name):
    return json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"][name]


def _truncate(src, nbytes):
    p = os.path.join(src, _shard_of(src, "model.norm.weight"))
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - nbytes)


def _corrupt_header(src):
    p = os.path.join(src, _shard_of(src, "model.norm.weight"))
    with open(p, "r+b") as f:
        f.seek(9)
        f.write(b"\xff garbage")


def _huge_header_length(src):
    p = os.path.join(src, _shard_of(src, "model.norm.weight"))
    with open(p, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))


def _retensor(change, fp8=False):
    def build(tmp):
        config = fp8_hf_config() if fp8 else tiny_hf_config()
        tensors = make_tensors(config, fp8=fp8)
        change(tensors)
        return write_hf_checkpoint(tmp, config, tensors)
    return build


def _plain(change_files):
    def build(tmp):
        config = tiny_hf_config()
        src = write_hf_checkpoint(tmp, config, make_tensors(config))
        change_files(src)
        return src
    return build


KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
BAD_INPUTS = {
    "missing shard file": (_plain(lambda s: os.remove(os.path.join(s, _shard_of(s, "lm_head.weight")))),
                           r"missing shard files \['model-00001-of-000\d\d\.safetensors'\]"),
    "index entry without tensor": (
        _plain(lambda s: _rewrite_index(s, lambda i: i["weight_map"].update(
            {"model.layers.0.mlp.extra.weight": i["weight_map"]["lm_head.weight"]}))),
        r"index\.json: entries point to tensors their shard does not hold: "
        r"\['model\.layers\.0\.mlp\.extra\.weight -> "),
    "tensor missing from index": (
        _plain(lambda s: _rewrite_index(s, lambda i: i["weight_map"].pop("model.norm.weight"))),
        r"shards hold tensors the index does not list: \['model\.norm\.weight in model-000"),
    "truncated file": (_plain(lambda s: _truncate(s, 100)),
                       r"model-000\d\d-of-000\d\d\.safetensors: truncated safetensors file: the header needs \d+ data "
                       r"bytes, the file has \d+"),
    "corrupt header": (_plain(_corrupt_header), r"\.safetensors: corrupt safetensors header \(not JSON"),
    "header length beyond the file": (_plain(_huge_header_length),
                                      r"\.safetensors: corrupt or truncated safetensors file: header length"),
    "unknown model_type": (_plain(lambda s: _rewrite_config(s, lambda c: c.update(model_type="llama"))),
                           r"config\.json: unsupported model_type 'llama'; this converter reads kimi_k2 and "
                           r"deepseek_v3"),
    "non-square FP8 blocks": (
        _plain(lambda s: _rewrite_config(s, lambda c: c.update(quantization_config={"weight_block_size": [128, 64]}))),
        r"config\.json: quantization_config\.weight_block_size=\[128, 64\]: expected two equal positive ints"),
    "config.json missing": (_plain(lambda s: os.remove(os.path.join(s, "config.json"))), r"config\.json: missing"),
    "shape contradicts config.json": (
        _plain(lambda s: _rewrite_config(s, lambda c: c.update(moe_intermediate_size=48))),
        r"tensor 'model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight': shape \[64, 32\], "
        r"config\.json implies \[64, 48\]"),
    "missing tensor": (_retensor(lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight")),
                       r"missing tensors \['model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'\]"),
    "unknown tensor": (_retensor(lambda t: t.update({"model.layers.1.mlp.experts.8.gate_proj.weight": torch.ones(2)})),
                       r"unknown tensors .*\['model\.layers\.1\.mlp\.experts\.8\.gate_proj\.weight in model-000"),
    "FP8 scale of floor shape": (
        _retensor(lambda t: t.update({KV_A + "_scale_inv": torch.ones(4, 1)}), fp8=True),
        r"tensor 'model\.layers\.1\.self_attn\.kv_a_proj_with_mqa\.weight_scale_inv': expected float32 \[5, 2\] "
        r"\(ceil\(\[576, 200\] / 128\)\), got torch\.float32 \[4, 1\]"),
    "FP8 scale not float32": (
        _retensor(lambda t: t.update({KV_A + "_scale_inv": t[KV_A + "_scale_inv"].bfloat16()}), fp8=True),
        r"kv_a_proj_with_mqa\.weight_scale_inv': expected float32 \[5, 2\] .*got torch\.bfloat16 \[5, 2\]"),
    "FP8 weight without scale": (_retensor(lambda t: t.pop(KV_A + "_scale_inv"), fp8=True),
                                 r"kv_a_proj_with_mqa\.weight': float8_e4m3fn without its .*weight_scale_inv"),
    "FP8 router": (_retensor(lambda t: t.update({"model.layers.1.mlp.gate.weight":
                                                 t["model.layers.1.mlp.gate.weight"].to(torch.float8_e4m3fn)})),
                   r"'model\.layers\.1\.mlp\.gate\.weight': float8_e4m3fn, but this tensor is never FP8-quantised"),
    "scale of a non-FP8 tensor": (_retensor(lambda t: t.update({"model.norm.weight_scale_inv": torch.ones(1, 1)})),
                                  r"model\.norm\.weight_scale_inv': a scale for a tensor that is not FP8"),
}


@pytest.fixture
def existing_output(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"previous model bytes")
    (out / "sub" / "notes.txt").write_text("keep me")
    return out


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_the_output_is_untouched(case, tmp_path, existing_output):
    build, match = BAD_INPUTS[case]
    src = build(tmp_path / "src")
    before = snapshot(existing_output)
    with pytest.raises(CheckpointError, match=match):
        convert_hf_to_hf(src, existing_output, overwrite=True)
    assert snapshot(existing_output) == before
    assert leftovers(tmp_path, "out") == []
    with pytest.raises(CheckpointError, match=match):  # a new output directory is not created either
        convert_hf_to_hf(src, tmp_path / "new")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path, "new") == []


def test_failure_in_the_middle_of_writing_leaves_the_output_untouched(tmp_path, existing_output, monkeypatch):
    config = tiny_hf_config()
    src = write_hf_checkpoint(tmp_path / "src", config, make_tensors(config), shard_bytes=50_000)
    calls = {"n": 0}
    read_group = HFCheckpoint.read_group

    def failing(self, group, **kw):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError("disk went away")
        return read_group(self, group, **kw)

    monkeypatch.setattr(HFCheckpoint, "read_group", failing)
    before = snapshot(existing_output)
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_hf(src, existing_output, overwrite=True, max_shard_size=20_000)
    assert calls["n"] == 60 and snapshot(existing_output) == before and leftovers(tmp_path, "out") == []
    monkeypatch.setattr(HFCheckpoint, "read_group", read_group)
    convert_hf_to_hf(src, existing_output, overwrite=True, max_shard_size=20_000)  # now it is replaced
    assert "sub" not in os.listdir(existing_output) and leftovers(tmp_path, "out") == []
    HFCheckpoint(existing_output).validate()


def test_output_must_not_be_the_input(tmp_path):
    config = tiny_hf_config()
    src = write_hf_checkpoint(tmp_path / "src", config, make_tensors(config))
    with pytest.raises(CheckpointError, match="must not be the input"):
        convert_hf_to_hf(src, src, overwrite=True)
    with pytest.raises(CheckpointError, match="must not be the input"):
        convert_hf_to_hf(src, os.path.join(src, "inner"))
