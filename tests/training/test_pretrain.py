"""The pretraining entry point end to end on CPU (in-process, single rank): it learns, it logs and plots, its
checkpoints resume bit-identically (also after SIGTERM), a crash mid-save leaves the previous checkpoint usable,
and corrupt or mismatched checkpoints give clear errors.

Runs are tiny (k2-tiny at seq 64, 512 tokens per step, a few steps); the module takes ~40-60 s on 2 cores.
"""

from __future__ import annotations

import glob
import json
import os
import signal

import pytest
import torch

from tests.helpers.model import require_no_cuda

from k2_megatron.config import load_config

pytestmark = pytest.mark.slow  # every test trains k2-tiny for a few steps

from tests.helpers import REPO_ROOT
from tests.helpers.torchrun import TINY_RUN

GRAD_NORM_ATOL = 1e-5  # measured: 2.5e-8 (norms ~0.7)


def _cfg(out_dir, *extra):
    return load_config(None, [f"output.dir={out_dir}", *TINY_RUN, *extra])


@pytest.fixture(autouse=True)
def _cpu_only():
    require_no_cuda()


def test_default_recipe_learns_logs_and_plots(tmp_path, capsys):
    from k2_megatron.training.pretrain import pretrain

    cfg = _cfg(tmp_path / "run", "train.iters=8", "train.eval_interval=4")
    result = pretrain(cfg)
    losses = result["losses"]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    # from ln(4096) = 8.32 at initialisation, clearly down after 8 steps of MuonClip at lr 1e-2
    assert losses[0] > 8.0 and losses[-1] < losses[0] - 0.5, losses
    assert [s for s, _ in result["valid"]] == [4, 8]
    assert result["valid"][1][1] < result["valid"][0][1]
    assert 6.0 < result["unigram_baseline"] < 8.0
    out = capsys.readouterr().out
    assert "validation loss" in out and "unigram baseline" in out and "max logit" in out and "expert load" in out
    assert os.path.isfile(result["plot"]) and result["plot"].endswith(".png") and f"plot: {result['plot']}" in out
    assert glob.glob(str(tmp_path / "run" / "tensorboard" / "events.out.tfevents.*"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    # the WSD schedule is what the optimizer got: step k (1-based in the logs) ran with lr(k - 1)
    sched = cfg.schedule()
    assert [r["lr"] for r in train] == [sched.lr(k) for k in range(8)]
    assert train[0]["grad_norm"] > 0 and set(train[0]["max_logits"]) == {f"layers.{i}.self_attention"
                                                                          for i in range(4)}
    assert set(train[0]["expert_load"]) == {"layers.1", "layers.2", "layers.3"}
    assert all(v >= 1.0 for v in train[0]["expert_load"].values())
    # published checkpoint at the end
    assert open(tmp_path / "run" / "checkpoints" / "latest").read().strip() == "iter_0000008"


def test_sigterm_checkpoint_and_bit_identical_resume(tmp_path):
    from k2_megatron.training.pretrain import pretrain

    reference = pretrain(_cfg(tmp_path / "ref", "train.iters=6", "checkpoint.save_at_end=false"))["losses"]

    def terminate_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = pretrain(_cfg(tmp_path / "run", "train.iters=6", "data.train_samples=48"), step_callback=terminate_at_3)
    assert first["stopped_by"] == "SIGTERM" and first["final_step"] == 3
    assert open(tmp_path / "run" / "checkpoints" / "latest").read().strip() == "iter_0000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    # data.train_samples given explicitly: the same dataset (and sample order) as the default iters x batch = 48
    second = pretrain(_cfg(tmp_path / "run", "train.iters=6", "data.train_samples=48"))
    assert second["final_step"] == 6 and len(second["losses"]) == 3
    # bit-identical: model, optimizer (momentum, Adam moments, steps), data position, expert biases
    assert first["losses"] + second["losses"] == reference
    assert [r["loss"] for r in second["history"]["train"]] == reference  # history rebuilt from metrics.jsonl


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    from k2_megatron.checkpoint.megatron import latest_checkpoint
    from k2_megatron.training.pretrain import pretrain

    class Crash(RuntimeError):
        pass

    def crash(tmp_dir):
        if tmp_dir.endswith("iter_0000002"):
            raise Crash("simulated crash after the files were written, before publishing")

    root = tmp_path / "run" / "checkpoints"
    # published by the next step's poll (asynchronous saves): the run stops there with the error (a failure to
    # write would be one CheckpointSaveError line; anything else keeps its type and traceback)
    with pytest.raises(Crash, match="simulated crash"):
        pretrain(_cfg(tmp_path / "run", "train.iters=3", "checkpoint.save_interval=1"), _before_publish=crash)
    assert latest_checkpoint(str(root)) == str(root / "iter_0000001")
    assert not glob.glob(str(root / ".tmp-*")) and not (root / "iter_0000002").exists()  # the failed save removed
    (root / ".tmp-iter_0000002").mkdir()  # what a killed process leaves behind
    (root / ".tmp-iter_0000002" / "__0_0.distcp").write_bytes(b"partial")
    result = pretrain(_cfg(tmp_path / "run", "train.iters=3"))
    assert len(result["losses"]) == 2  # resumed after step 1
    assert latest_checkpoint(str(root)) == str(root / "iter_0000003")
    assert not glob.glob(str(root / ".tmp-*"))  # the interrupted save was cleaned up


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path):
    from k2_megatron.checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError
    from k2_megatron.training.pretrain import pretrain

    base = pretrain(_cfg(tmp_path / "run", "train.iters=4"))
    ckpt = tmp_path / "run" / "checkpoints"
    with pytest.raises(CheckpointMismatchError, match="num_hidden_layers: checkpoint 4, this run 2"):
        pretrain(_cfg(tmp_path / "run", "train.iters=5", "model.overrides.num_hidden_layers=2"))
    with pytest.raises(CheckpointMismatchError, match=r"data.train_samples=32, this run's for 40 \(train.iters"):
        pretrain(_cfg(tmp_path / "run", "train.iters=5"))
    # a new stage from these weights: YaRN over twice the context at twice the sequence length (rope settings and
    # data may change; the architecture may not)
    stage_args = ["train.iters=2", "model.yarn_factor=64", "data.seq_length=128", f"checkpoint.load={ckpt}"]
    stage = pretrain(_cfg(tmp_path / "long", *stage_args, "checkpoint.load_mode=weights"))
    assert stage["final_step"] == 2 and stage["losses"][0] < base["losses"][0] - 0.2  # trained weights, not init
    # the weights alone: the same first loss; the optimizer starts afresh (no momentum), so another second step
    fresh = pretrain(_cfg(tmp_path / "fresh", *stage_args, "checkpoint.load_mode=model"))
    assert fresh["losses"][0] == stage["losses"][0] and fresh["losses"][1] != stage["losses"][1]
    shards = sorted(glob.glob(str(ckpt / "iter_0000004" / "*.distcp")))
    assert shards
    with open(shards[0], "r+b") as f:  # flip bytes in the middle of a shard file
        f.seek(os.path.getsize(shards[0]) // 2)
        f.write(b"\x00corrupt\x00")
    with pytest.raises(CheckpointCorruptError, match="corrupt"):
        pretrain(_cfg(tmp_path / "run", "train.iters=5"))
    with pytest.raises(Exception, match="no checkpoint there"):
        pretrain(_cfg(tmp_path / "other", "train.iters=2", f"checkpoint.load={tmp_path / 'nowhere'}"))


_QUIET = ("output.plot=false", "output.tensorboard=false", "checkpoint.save_at_end=false")


def test_prebuilt_dataset_index_is_loaded_not_built(tmp_path, capsys):
    """data.index_dir: the run loads the index built offline, also for fewer steps than it was built for, builds
    none, and trains exactly as on the indices megatron builds at startup (which go to <output.dir>/gpt_indices);
    without an index the command line stops at once with one line naming data.index_dir and the build command."""
    from k2_megatron.data import build_dataset_index, load_tokenizer, prepare_corpus_data
    from k2_megatron.training.pretrain import main, pretrain
    from tests.helpers.data import index_building_forbidden

    startup = pretrain(_cfg(tmp_path / "startup", "train.iters=2", *_QUIET))
    assert glob.glob(str(tmp_path / "startup" / "gpt_indices" / "*-GPTDataset-train-shuffle_index.npy"))
    index_dir = str(tmp_path / "indices")
    overrides = [*TINY_RUN, f"data.index_dir={index_dir}", *_QUIET]
    assert main([f"output.dir={tmp_path / 'missing'}", "train.iters=2", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"k2-pretrain: DatasetIndexError: data.index_dir={index_dir}: ") and (
        "python tools/preprocess_data.py build-index --tokenizer" in err and "--train-samples 16 " in err)
    tok = load_tokenizer("default:4096")
    corpus = prepare_corpus_data(tok)
    build_dataset_index(tok, 64, corpus.train_prefix, corpus.valid_prefix, train_samples=16, index_dir=index_dir)
    with index_building_forbidden():
        indexed = pretrain(load_config(None, [f"output.dir={tmp_path / 'indexed'}", "train.iters=2", *overrides]))
        shorter = pretrain(load_config(None, [f"output.dir={tmp_path / 'shorter'}", "train.iters=1", *overrides]))
    assert indexed["losses"] == startup["losses"] and indexed["valid"] == startup["valid"]
    assert shorter["losses"] == startup["losses"][:1]  # the same index: the same first samples
    assert not os.path.exists(tmp_path / "indexed" / "gpt_indices")


def test_process_group_timeout_reaches_every_process_group(tmp_path):
    """parallel.process_group_timeout_minutes is the timeout of the default process group and of every group
    megatron-core makes (by default they would wait 30 minutes on gloo; the default NCCL group 10)."""
    from datetime import timedelta

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from k2_megatron.training.pretrain import pretrain

    timeouts = []

    def read_timeouts(step, metrics):
        groups = (dist.group.WORLD, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                  ps.get_data_parallel_group(), ps.get_expert_model_parallel_group(),
                  ps.get_context_parallel_group())
        timeouts.extend(g._get_backend(torch.device("cpu")).options._timeout for g in groups)

    pretrain(_cfg(tmp_path, "train.iters=1", "parallel.process_group_timeout_minutes=7", *_QUIET),
             step_callback=read_timeouts)
    assert timeouts == [timedelta(minutes=7)] * 6


@pytest.mark.distributed
def test_two_process_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2` (gloo, data-parallel 2 with ZeRO-1 over the two ranks): the same global
    batches as one process, so the same losses and grad norms up to the order of the gradient reduction (summing
    instead of averaging over the ranks would double the norm and change no loss)."""
    from tests.helpers.torchrun import run_torchrun, train_rows

    from k2_megatron.training.pretrain import pretrain

    overrides = ["train.iters=2", "checkpoint.save_at_end=false", "output.plot=false"]
    single = pretrain(_cfg(tmp_path / "one", *overrides))["history"]["train"]
    stdout = run_torchrun(tmp_path / "two", *overrides, timeout=240)
    assert "DP2 (EP1, ZeRO-1)" in stdout
    rows = train_rows(tmp_path / "two")
    assert len(rows) == len(single) == 2
    for key, atol in (("loss", 2e-4), ("grad_norm", GRAD_NORM_ATOL)):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows]), torch.tensor([r[key] for r in single]),
                                   rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def test_qk_clip_experiment_caps_max_logits(tmp_path):
    """examples/qk_clip_experiment.py at a smaller budget: plain Muon's max logit runs far past tau, MuonClip's stays
    within one step's growth of tau; the plot is written. (k2-tiny pretrains with plain RoPE: its logits are
    (0.1 ln 32 + 1)^2 ~ 1.8x smaller than under YaRN, so they need 48 steps to run away; measured: Muon peaks at 22,
    MuonClip at 7.6.)"""
    import importlib.util

    path = str(REPO_ROOT / "examples" / "qk_clip_experiment.py")
    spec = importlib.util.spec_from_file_location("qk_clip_experiment", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    tau = 5.0
    result = experiment.main(["--steps", "48", "--tau", str(tau), "--out", str(tmp_path), "data.seq_length=64",
                              "train.global_batch_tokens=512", "train.micro_batch_size=4",
                              "train.eval_micro_batches=2"])
    assert max(result["muon"]) > 3 * tau
    assert max(result["muonclip"]) < 2 * tau and max(result["muonclip"][-10:]) < 1.75 * tau
    assert os.path.isfile(result["plot"])
