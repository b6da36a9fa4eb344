"""HF <-> megatron conversion through our megatron-core K2 model (one CPU process, gloo, TP = PP = EP = 1).

- A tiny random transformers DeepseekV3ForCausalLM (saved with save_pretrained) -> megatron
  dist_checkpointing -> HF: every tensor bit-identical (float32), and bf16 likewise.
- Logits of transformers (from the HF directory) and of our megatron model (from the converted
  checkpoint) agree in float32 to 2e-5 absolute (|logits| ~ 3; measured ~2e-6; the model parity tests use
  the same bound).
- Layouts: BF16 HF -> megatron written by two gloo processes as TP2, PP2 and EP2 (each rank streams in only
  its shard / stage) -> HF in one process: every tensor bit-identical (TP = PP = EP = 1: test_round_trip_bf16);
  under EP2 each rank reads only its own experts' tensors (and every dense one), counted at the reader.
- FP8: our FP8 export -> megatron (bf16) -> FP8 export again gives the same q and scale_inv bits.
- Bad input: a clear error, the output directory untouched.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import json

import pytest
import torch

from tests.helpers.checkpoint import leftovers, snapshot

pytestmark = pytest.mark.slow  # converts a transformers model through megatron

LOGIT_ATOL = 2e-5


@pytest.fixture(scope="module", autouse=True)
def _megatron_on_cpu():
    yield
    from tests.helpers.model import teardown_megatron

    teardown_megatron()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.helpers.model import k2_like_tiny_config, make_hf_model

    path = tmp_path_factory.mktemp("hf") / "tiny"
    make_hf_model(k2_like_tiny_config(), seed=2).save_pretrained(path, safe_serialization=True,
                                                                   max_shard_size="300KB")
    return path


def _raw(path) -> dict:
    from k2_megatron.checkpoint.hf.safetensors_io import HFCheckpoint

    ckpt = HFCheckpoint(path)
    return {n: t for g in ckpt.groups() for n, t in ckpt.read_group(g, dequantize=False)}


def _same(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ in dtype, shape or any bit."""
    def bits(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    assert a.keys() == b.keys(), (sorted(a.keys() - b.keys())[:5], sorted(b.keys() - a.keys())[:5])
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]


def test_round_trip_fp32_and_logits(hf_dir, tmp_path):
    from k2_megatron.checkpoint.convert import compare_logits, convert_hf_to_megatron, convert_megatron_to_hf

    to_meg = convert_hf_to_megatron(hf_dir, tmp_path / "meg")
    assert os.path.isfile(tmp_path / "meg" / "hf_config.json") and to_meg.tensors == len(_raw(hf_dir))
    back = convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="200KB")
    print(f"\n{to_meg.summary()}\n{back.summary()}")
    assert _same(_raw(hf_dir), _raw(tmp_path / "back")) == []
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["hidden_size"] == 64
    diff = compare_logits(tmp_path / "back", tmp_path / "meg", seq=24)
    assert diff <= LOGIT_ATOL, diff
    assert leftovers(tmp_path, "meg") == [] and leftovers(tmp_path, "back") == []


def test_round_trip_bf16(hf_dir, tmp_path):
    from k2_megatron.checkpoint.convert import convert_hf_to_hf, convert_hf_to_megatron, convert_megatron_to_hf

    convert_hf_to_hf(hf_dir, tmp_path / "bf16", dtype="bf16")
    convert_hf_to_megatron(tmp_path / "bf16", tmp_path / "meg")  # bf16 parameters (the source's dtype)
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", model_type="kimi_k2")
    src, back = _raw(tmp_path / "bf16"), _raw(tmp_path / "back")
    assert _same(src, back) == []
    assert {t.dtype for k, t in back.items() if "correction_bias" not in k} == {torch.bfloat16}
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "kimi_k2"


def test_fp8_export_survives_megatron(hf_dir, tmp_path):
    from k2_megatron.checkpoint.convert import (
        compare_logits,
        convert_hf_to_hf,
        convert_hf_to_megatron,
        convert_megatron_to_hf,
    )

    convert_hf_to_hf(hf_dir, tmp_path / "fp8", fp8_export=True)
    convert_hf_to_megatron(tmp_path / "fp8", tmp_path / "meg")  # dequantised into a bf16 model
    # transformers on the FP8 directory (dequantised to bf16 by our reader) vs the bf16 megatron model
    assert compare_logits(tmp_path / "fp8", tmp_path / "meg", seq=24) <= LOGIT_ATOL
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back", fp8_export=True)
    fp8, back = _raw(tmp_path / "fp8"), _raw(tmp_path / "back")
    quantised = [k for k, t in fp8.items() if t.dtype == torch.float8_e4m3fn]
    assert len(quantised) > 50
    assert _same({k: fp8[k] for k in quantised}, {k: back[k] for k in quantised}) == []
    assert _same({k + "_scale_inv": fp8[k + "_scale_inv"] for k in quantised},
                 {k + "_scale_inv": back[k + "_scale_inv"] for k in quantised}) == []
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_bad_inputs_leave_the_output_untouched(hf_dir, tmp_path):
    import shutil

    from k2_megatron.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from k2_megatron.checkpoint.errors import CheckpointError

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.distcp").write_bytes(b"previous")
    before = snapshot(out)
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    os.remove(bad / index["weight_map"]["model.layers.2.mlp.experts.3.down_proj.weight"])
    with pytest.raises(CheckpointError, match=r"missing shard files \['model-000"):
        convert_hf_to_megatron(bad, out, overwrite=True)
    with pytest.raises(CheckpointError, match="output exists; pass overwrite"):
        convert_hf_to_megatron(hf_dir, out)
    with pytest.raises(CheckpointError, match=r"not a converted megatron checkpoint \(no hf_config\.json\)"):
        convert_megatron_to_hf(out, tmp_path / "hf_out")
    assert snapshot(out) == before and leftovers(tmp_path, "out") == [] and not (tmp_path / "hf_out").exists()



def test_megatron_checkpoint_checked_against_its_config_before_writing(hf_dir, tmp_path):
    import shutil

    import torch.distributed.checkpoint as dcp

    from k2_megatron.checkpoint.convert import (
        _load_torch_dist,
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        read_megatron_index,
    )
    from k2_megatron.checkpoint.errors import CheckpointError

    convert_hf_to_megatron(hf_dir, tmp_path / "meg")
    _, _, stored = read_megatron_index(tmp_path / "meg")
    state = _load_torch_dist(str(tmp_path / "meg"), stored)
    state.pop("decoder.layers.2.mlp.experts.linear_fc2_weight")
    state["decoder.layers.1.self_attention.linear_kv_down_proj.weight"] = torch.zeros(41, 64)
    state["optimizer.state.exp_avg.embedding.word_embeddings.weight"] = torch.zeros(3)  # not a model tensor
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "bad")), no_dist=True)
    shutil.copy(tmp_path / "meg" / "hf_config.json", tmp_path / "bad" / "hf_config.json")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous")
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"bad does not match its hf_config\.json: missing "
                       r"\['decoder\.layers\.2\.mlp\.experts\.linear_fc2_weight'\], unknown \[\], wrong shapes "
                       r"\['decoder\.layers\.1\.self_attention\.linear_kv_down_proj\.weight: shape \[41, 64\], "
                       r"hf_config\.json implies \[40, 64\]'\]"):
        convert_megatron_to_hf(tmp_path / "bad", out, overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path, "out") == []


# ----- other layouts: hf -> megatron run by 2 gloo processes (each rank streams in its shard and they save
# one torch_dist checkpoint together), then megatron -> hf here: BF16 bit-identical for TP2, PP2 and EP2
# (TP = PP = EP = 1 is test_round_trip_bf16) -----

LAYOUTS = {"TP2": (2, 1, 1), "PP2": (1, 2, 1), "EP2": (1, 1, 2)}


def _layout_worker(rank, world, init_file, hf_path, out_root, result_path):
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch.set_num_threads(1)
    results = {}
    try:
        from megatron.core import parallel_state

        from k2_megatron.checkpoint.convert import convert_hf_to_megatron
        from k2_megatron.config import ParallelLayout
        from k2_megatron.checkpoint.hf.safetensors_io import HFCheckpoint
        from k2_megatron.megatron import init_distributed_cpu

        read = []  # every tensor group this rank reads from the HF files
        read_group = HFCheckpoint.read_group

        def recording_read_group(self, group, **kwargs):
            read.append(group[0])
            return read_group(self, group, **kwargs)

        HFCheckpoint.read_group = recording_read_group
        for name, (tp, pp, ep) in LAYOUTS.items():
            init_distributed_cpu(ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep),
                                 rank=rank, world_size=world, init_method=f"file://{init_file}")
            read.clear()
            stats = convert_hf_to_megatron(hf_path, os.path.join(out_root, name))
            results[name] = {"tensors": stats.tensors, "bytes_read": stats.bytes_read, "read": list(read),
                             "tp": parallel_state.get_tensor_model_parallel_world_size(),
                             "pp": parallel_state.get_pipeline_model_parallel_world_size(),
                             "ep": parallel_state.get_expert_model_parallel_world_size(),
                             "ep_rank": parallel_state.get_expert_model_parallel_rank()}
            torch.distributed.barrier()
    except BaseException as exc:  # report the error to the parent
        import traceback

        results["error"] = "".join(traceback.format_exception(exc))
    torch.save(results, result_path)


def _expert_of(name):
    import re

    m = re.match(r"^model\.layers\.\d+\.mlp\.experts\.(\d+)\.", name)
    return None if m is None else int(m.group(1))


@pytest.mark.slow
@pytest.mark.distributed
def test_round_trip_through_sharded_layouts(hf_dir, tmp_path):
    from tests.helpers.model import run_gloo_workers

    from k2_megatron.checkpoint.convert import convert_hf_to_hf, convert_megatron_to_hf
    from k2_megatron.checkpoint.hf.safetensors_io import HFCheckpoint

    bf16_dir = tmp_path / "bf16"
    convert_hf_to_hf(hf_dir, bf16_dir, dtype="bf16")  # BF16 tensors, bf16 megatron parameters
    world = 2
    results = run_gloo_workers(_layout_worker, world, lambda r, path: (r, world, str(tmp_path / "init"),
                                                                       str(bf16_dir), str(tmp_path), path))
    src = _raw(bf16_dir)
    assert {t.dtype for k, t in src.items() if "correction_bias" not in k} == {torch.bfloat16}
    for name, (tp, pp, ep) in LAYOUTS.items():
        assert [(res[name]["tp"], res[name]["pp"], res[name]["ep"]) for res in results] == [(tp, pp, ep)] * world
        if pp == 2:  # each stage reads only its own layers (+ embedding or head)
            assert sum(res[name]["tensors"] for res in results) == len(src)
        convert_megatron_to_hf(tmp_path / name, tmp_path / f"{name}_hf")
        assert _same(src, _raw(tmp_path / f"{name}_hf")) == [], name
    # EP2: each rank reads its own experts (4 of the 8 per layer) and every dense tensor, nothing twice
    ckpt = HFCheckpoint(bf16_dir)
    groups = {g[0]: g for g in ckpt.groups()}
    per_rank = ckpt.config.n_routed_experts // 2
    expert_bytes = 0
    for res in results:
        ep_rank, read = res["EP2"]["ep_rank"], res["EP2"]["read"]
        want = {n for n in groups if _expert_of(n) is None or _expert_of(n) // per_rank == ep_rank}
        assert len(read) == len(set(read)) and set(read) == want, sorted(set(read) ^ want)[:6]
        assert res["EP2"]["bytes_read"] == sum(ckpt.group_bytes(groups[n]) for n in want)
        expert_bytes += sum(ckpt.group_bytes(groups[n]) for n in read if _expert_of(n) is not None)
    assert expert_bytes == sum(ckpt.group_bytes(g) for n, g in groups.items() if _expert_of(n) is not None)


def test_adapter_maps_one_ranks_experts():
    from tests.helpers.model import full_megatron_state_dict, k2_like_tiny_config

    from k2_megatron.checkpoint.hf.adapter import StateDictMismatch, hf_to_megatron, megatron_to_hf

    cfg = k2_like_tiny_config()
    meg = full_megatron_state_dict(cfg)
    fused = megatron_to_hf(meg, cfg, expert_layout="fused")
    per_expert = megatron_to_hf(meg, cfg, expert_layout="per_expert")
    mine = range(4, 8)
    others = {k for k in per_expert if _expert_of(k) is not None and _expert_of(k) not in mine}
    only_mine = {k: v for k, v in per_expert.items() if k not in others}
    for hf in (fused, only_mine):  # a fused stack is sliced; per-expert tensors of other experts are not needed
        part = hf_to_megatron(hf, cfg, experts=mine)
        assert part.keys() == meg.keys()
        for k, v in part.items():
            want = meg[k][4:8] if k.endswith(("linear_fc1_weight", "linear_fc2_weight")) else meg[k]
            assert torch.equal(v, want), k
    with pytest.raises(StateDictMismatch, match="unexpected"):
        hf_to_megatron(per_expert, cfg, experts=mine)  # strict: other ranks' experts are not this rank's
    with pytest.raises(ValueError, match="not a contiguous range of the 8 experts"):
        hf_to_megatron(fused, cfg, experts=range(6, 10))


def test_cli_megatron_directions_with_logit_validation(hf_dir, tmp_path, capsys):
    from k2_megatron.checkpoint import convert_cli

    assert convert_cli.main(["hf-to-megatron", "--src", str(hf_dir), "--dst", str(tmp_path / "meg"), "--validate",
                             "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "hf->megatron: 129 tensors" in out and "validate: logits max |transformers - megatron|" in out
    assert "ok" in out.splitlines()[-1]
    assert convert_cli.main(["megatron-to-hf", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / "fp8"),
                             "--fp8-export", "--model-type", "kimi_k2", "--validate", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tensors compared with the megatron checkpoint" in out and "logits not compared" in out
    assert convert_cli.main(["megatron-to-hf", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / "bf16"),
                             "--dtype", "bf16", "--validate", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tensors compared with the megatron checkpoint" in out and "logits not compared" in out
    assert convert_cli.main(["megatron-to-hf", "--src", str(tmp_path / "meg"), "--dst", str(tmp_path / "same"),
                             "--validate", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tensors compared with the megatron checkpoint" in out and "validate: logits max" in out
    assert convert_cli.main(["hf-to-megatron", "--src", str(hf_dir), "--dst", str(tmp_path / "x"),
                             "--fp8-export", "--no-progress"]) == 2
    assert "apply to Hugging Face outputs only" in capsys.readouterr().err


# ----- DeepSeek-V3 checkpoints: num_nextn_predict_layers = 1 (every release, every DeepseekV3Config default) -----

@pytest.fixture(scope="module")
def deepseek_v3_dirs(tmp_path_factory):
    """{"plain": a DeepseekV3ForCausalLM saved by transformers with its default num_nextn_predict_layers=1 (the shards
    hold no MTP tensor, as transformers saves it), "mtp": the same plus a release-style MTP layer
    (model.layers.<num_hidden_layers>.*: a whole MoE decoder layer, embed_tokens, enorm, hnorm, eh_proj,
    shared_head) written with safetensors' own writer}."""
    from tests.helpers.checkpoint import write_hf_checkpoint
    from tests.helpers.model import k2_like_tiny_config, make_hf_model
    from transformers import DeepseekV3Config

    from k2_megatron.checkpoint.hf.safetensors_io import expected_mtp_shapes
    from k2_megatron.config import config_to_hf

    cfg = k2_like_tiny_config()
    model = make_hf_model(cfg, seed=3)
    hf = config_to_hf(cfg, "deepseek_v3")
    del hf["num_nextn_predict_layers"]  # transformers' default
    model.config = DeepseekV3Config(**hf)
    root = tmp_path_factory.mktemp("dsv3")
    model.save_pretrained(root / "plain", safe_serialization=True, max_shard_size="300KB")
    config = json.loads((root / "plain" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    g = torch.Generator().manual_seed(4)
    mtp = {name: 0.05 * torch.randn(shape, generator=g) for name, shape in expected_mtp_shapes(cfg, 1).items()}
    assert f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in mtp and len(mtp) > 20
    write_hf_checkpoint(root / "mtp", config, {**_raw(root / "plain"), **mtp})
    return {"plain": root / "plain", "mtp": root / "mtp", "mtp_names": sorted(mtp), "cfg": cfg}


def test_deepseek_v3_with_mtp_config_converts_to_megatron_and_back(deepseek_v3_dirs, tmp_path):
    from k2_megatron.checkpoint.convert import compare_logits, convert_hf_to_megatron, convert_megatron_to_hf

    plain, with_mtp = deepseek_v3_dirs["plain"], deepseek_v3_dirs["mtp"]
    layer = deepseek_v3_dirs["cfg"].num_hidden_layers
    stats = convert_hf_to_megatron(plain, tmp_path / "meg")
    assert stats.notes == [f"multi-token prediction: config.json has num_nextn_predict_layers=1; the shards hold no "
                           f"tensor of model.layers.{layer}.*"]
    assert json.loads((tmp_path / "meg" / "hf_config.json").read_text())["num_nextn_predict_layers"] == 0
    stats = convert_hf_to_megatron(with_mtp, tmp_path / "meg_mtp")
    n_mtp = len(deepseek_v3_dirs["mtp_names"])
    assert len(stats.notes) == 1 and stats.notes[0].startswith(
        f"multi-token prediction: skipped {n_mtp} tensors of model.layers.{layer}.* (")
    assert stats.notes[0] in stats.summary().splitlines()
    assert stats.tensors == len(_raw(plain))  # the main model's tensors, nothing of the MTP layer
    # the MTP tensors change nothing: both megatron checkpoints hold the same model
    for src in ("meg", "meg_mtp"):
        convert_megatron_to_hf(tmp_path / src, tmp_path / f"{src}_hf")
        assert _same(_raw(plain), _raw(tmp_path / f"{src}_hf")) == [], src
        back = json.loads((tmp_path / f"{src}_hf" / "config.json").read_text())
        assert back["num_nextn_predict_layers"] == 0 and back["model_type"] == "deepseek_v3"
    assert compare_logits(plain, tmp_path / "meg", seq=24) <= LOGIT_ATOL
    assert compare_logits(with_mtp, tmp_path / "meg_mtp", seq=24) <= LOGIT_ATOL


def test_deepseek_v3_mtp_tensors_kept_by_hf_to_hf_and_fp8(deepseek_v3_dirs, tmp_path):
    from k2_megatron.checkpoint.convert import (
        compare_logits,
        convert_hf_to_hf,
        convert_hf_to_megatron,
        validate_hf_conversion,
    )

    with_mtp, names = deepseek_v3_dirs["mtp"], deepseek_v3_dirs["mtp_names"]
    stats = convert_hf_to_hf(with_mtp, tmp_path / "bf16", dtype="bf16")
    assert any(n.startswith(f"multi-token prediction: kept {len(names)} tensors") for n in stats.notes)
    src, out = _raw(with_mtp), _raw(tmp_path / "bf16")
    assert set(names) <= set(out) and set(out) == set(src)
    for n in names:  # cast like the main model's tensors: the router bias stays fp32
        want = src[n] if n.endswith("e_score_correction_bias") else src[n].to(torch.bfloat16)
        assert out[n].dtype == want.dtype and torch.equal(out[n], want), n
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    ok, lines = validate_hf_conversion(with_mtp, tmp_path / "bf16")
    assert ok, lines
    # FP8 export quantises the MTP layer's projections like the main model's (as the release stores them)
    convert_hf_to_hf(with_mtp, tmp_path / "fp8", fp8_export=True)
    fp8 = _raw(tmp_path / "fp8")
    eh_proj = f"model.layers.{deepseek_v3_dirs['cfg'].num_hidden_layers}.eh_proj.weight"
    assert fp8[eh_proj].dtype == torch.float8_e4m3fn and eh_proj + "_scale_inv" in fp8
    stats = convert_hf_to_megatron(tmp_path / "fp8", tmp_path / "meg")
    assert "skipped" in stats.notes[0]
    assert compare_logits(tmp_path / "fp8", tmp_path / "meg", seq=24) <= LOGIT_ATOL


def test_deepseek_v3_cli_validates_with_mtp(deepseek_v3_dirs, tmp_path, capsys):
    from k2_megatron.checkpoint import convert_cli

    src = str(deepseek_v3_dirs["mtp"])
    assert convert_cli.main(["hf-to-megatron", "--src", src, "--dst", str(tmp_path / "meg"), "--validate",
                             "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "multi-token prediction: skipped" in out and "ok" in out.splitlines()[-1]
    assert convert_cli.main(["hf-to-hf", "--src", src, "--dst", str(tmp_path / "hf"), "--validate",
                             "--no-progress"]) == 0
    assert "multi-token prediction: kept" in capsys.readouterr().out


@pytest.mark.parametrize("name, layers", [("model.layers.{L}.mlp.bogus.weight", 1),   # not an MTP tensor name
                                          ("model.layers.{L1}.eh_proj.weight", 1),    # a second MTP layer
                                          ("model.layers.{L}.eh_proj.weight", 0)])    # K2: no MTP layer
def test_tensors_beyond_the_declared_layers_are_refused(deepseek_v3_dirs, tmp_path, name, layers):
    from tests.helpers.checkpoint import write_hf_checkpoint

    from k2_megatron.checkpoint.convert import convert_hf_to_megatron
    from k2_megatron.checkpoint.errors import CheckpointError

    L = deepseek_v3_dirs["cfg"].num_hidden_layers
    name = name.format(L=L, L1=L + 1)
    config = json.loads((deepseek_v3_dirs["plain"] / "config.json").read_text())
    config["num_nextn_predict_layers"] = layers
    H = deepseek_v3_dirs["cfg"].hidden_size
    write_hf_checkpoint(tmp_path / "bad", config, {**_raw(deepseek_v3_dirs["plain"]), name: torch.zeros(H, 2 * H)})
    with pytest.raises(CheckpointError, match=r"unknown tensors .*" + name.replace(".", r"\.")):
        convert_hf_to_megatron(tmp_path / "bad", tmp_path / "meg")
    assert not (tmp_path / "meg").exists()
