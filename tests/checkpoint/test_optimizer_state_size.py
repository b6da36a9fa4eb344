"""A pretraining checkpoint holds Muon's momentum once (k2_megatron.megatron.optimizer_state): bf16 k2-tiny with fp32
master weights and ZeRO-1 MuonClip, one step, saved; the checkpoint's tensors are the bf16 weights, one fp32 master
copy and one fp32 momentum / first moment per parameter, and a second moment for the AdamW parameters only; the
files on disk hold those bytes and little more. A Muon parameter that also wrote its momentum as ``exp_avg_sq`` (or
any second copy) would add 4 bytes per Muon element: most of the model."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PREFIX = "optimizer.state."


def _body(rank, world, init_file, tmp):
    from tests.helpers.pretraining import build_zero1_bf16, train_step
    from k2_megatron.checkpoint.dcp_metadata import read_metadata
    from k2_megatron.checkpoint.megatron import save_checkpoint
    from k2_megatron.config import ParallelLayout
    import torch

    cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
    train_step(cfg, chunks, opt)
    path = save_checkpoint(os.path.join(tmp, "ckpt"), 1, chunks, opt, {})
    use_muon = {}
    for sub in opt.chained_optimizers:
        for group in sub.optimizer.param_groups:
            for main in group["params"]:
                use_muon[sub.main_to_model[main]] = group["use_muon"]
    gpt = chunks[0].module.module
    names = {p: n for n, p in gpt.named_parameters()}
    metadata = read_metadata(path)
    tensors = {key: (md.properties.dtype.itemsize * _numel(md.size)) for key, md in
               metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
    files = {name: os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
             if name.endswith(".distcp")}
    return {"tensors": tensors, "files": files, 
            "model": sum(t.numel() * t.element_size() for n, t in gpt.state_dict().items()
                         if isinstance(t, torch.Tensor) and not n.endswith("_extra_state")),
            "params": {names[p]: (p.numel(), use_muon[p]) for p in use_muon}}


def _numel(size) -> int:
    n = 1
    for s in size:
        n *= s
    return n


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tests.helpers.model import run_gloo_bodies

    tmp = str(tmp_path_factory.mktemp("state_size"))
    return run_gloo_bodies(_body, 1, lambda r: (r, 1, os.path.join(tmp, "init"), tmp), timeout=300)[0]


def _elements(params) -> tuple[int, int]:
    """(Muon elements, AdamW elements) of the model."""
    return sum(n for n, m in params.values() if m), sum(n for n, m in params.values() if not m)


def _state(tensors, kind):
    return {key[len(PREFIX) + len(kind) + 1:]: n for key, n in tensors.items() if key.startswith(f"{PREFIX}{kind}.")}


def test_muon_momentum_is_written_once(saved):
    tensors, params = saved["tensors"], saved["params"]
    muon, adamw = _elements(params)
    assert muon > adamw  # a model mostly of Muon matrices: a second momentum copy would show
    kinds = {key[len(PREFIX):].split(".")[0] for key in tensors if key.startswith(PREFIX)}
    assert kinds == {"fp32_param", "exp_avg", "exp_avg_sq"}, kinds
    assert sum(_state(tensors, "fp32_param").values()) == 4 * (muon + adamw)
    assert sum(_state(tensors, "exp_avg").values()) == 4 * (muon + adamw)  # Muon's momentum, Adam's first moment
    second = _state(tensors, "exp_avg_sq")
    assert sum(second.values()) == 4 * adamw  # Adam's second moment only
    assert not [key for key in second if any(key.endswith(name) and m for name, (_, m) in params.items())]
    model = sum(n for key, n in tensors.items() if not key.startswith(PREFIX))
    assert model == saved["model"]  # the model's state dict: bf16 weights and the routers' expert biases
    assert 2 * (muon + adamw) <= model < 2 * (muon + adamw) * 1.01


def test_checkpoint_files_hold_params_masters_and_one_momentum(saved):
    params = saved["params"]
    muon, adamw = _elements(params)
    expected = saved["model"] + 4 * (muon + adamw) + 4 * (muon + adamw) + 4 * adamw  # weights, masters, moments
    written = sum(saved["files"].values())
    # what the files add to the tensors (serialisation headers, ~8% for this model's 200-odd small tensors) stays
    # below half of a second momentum (4 bytes per Muon element)
    assert expected <= written < expected + 4 * muon / 2, (written, expected, 4 * muon)
