"""What k2-pretrain says when it cannot run: every bad config of the list below is one line on stderr naming the key,
exit status 2, through the command line's own ``main`` (in-process: the errors come before any model is built);
a save that cannot be written (a full disk) is one line with the errno and the file, exit status 1, and leaves no
partial ``.tmp-iter_*``; a lone process leaves no gloo store file in the temporary directory, on success or failure.
"""

from __future__ import annotations

import errno
import functools
import glob
import os

import pytest
import torch.distributed as dist

from k2_megatron.config import ConfigError, load_config
from k2_megatron.config.parallel import ParallelLayout
from k2_megatron.training.run_lock import LOCK_NAME

from tests.helpers.model import require_no_cuda
from tests.helpers.torchrun import TINY_RUN

QUIET = ("output.tensorboard=false", "output.plot=false", "train.iters=1")


@pytest.fixture(autouse=True)
def _cpu_only():
    require_no_cuda()


def _corpus_prefix() -> str:
    """The bundled corpus' training prefix (cached by the default tokenizer's first run)."""
    from k2_megatron.data import load_tokenizer, prepare_corpus_data

    return prepare_corpus_data(load_tokenizer("default:4096")).train_prefix


# (overrides, the key the line must name); {corpus}: a real dataset prefix
BAD_CONFIGS = [
    (["parallel.tensor=3"], "parallel.tensor"),
    (["parallel.pipeline=2"], "parallel.pipeline"),
    (["parallel.expert=2"], "parallel.expert"),
    (["parallel.tensor=0"], "parallel.tensor"),
    (["data.tokenizer=bpe:/nonexistent/tokenizer.json"], "data.tokenizer"),
    (["data.tokenizer=tiktoken:/nonexistent/tiktoken.model"], "data.tokenizer"),
    (["data.tokenizer=default:abc"], "data.tokenizer"),
    (["data.tokenizer=default:10"], "data.tokenizer"),
    (["data.tokenizer=gpt2"], "data.tokenizer"),
    (["model.overrides.bogus=1"], "model.overrides.bogus"),
    (["model.overrides.num_hiden_layers=2"], "model.overrides.num_hiden_layers"),
    (["model.overrides.hidden_size=abc"], "hidden_size"),
    (["model.overrides.vocab_size=10"], "model.overrides.vocab_size"),
    (["model.overrides=5"], "model.overrides"),
    (["data.train_prefix=/nonexistent/train", "data.valid_prefix=/nonexistent/valid"], "data.train_prefix"),
    (["data.train_prefix={corpus}", "data.valid_prefix=/nonexistent/valid"], "data.valid_prefix"),
    (["data.train_prefix=/nonexistent/train"], "data.train_prefix"),
    (["data.index_dir=/nonexistent/indices"], "data.index_dir"),
    (["checkpoint.load=/nonexistent/checkpoint"], "checkpoint.load"),
    (["checkpoint.load_mode=partial"], "checkpoint.load_mode"),
    (["train.micro_batch_size=3"], "micro_batch_size"),
    (["train.iters=0"], "train.iters"),
    (["train.iterz=3"], "train.iterz"),
    (["data.seq_length=100000"], "data.seq_length"),
    (["optim.peak_lr=-1"], "optim.peak_lr"),
]


@pytest.mark.parametrize("overrides, key", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_a_bad_config_is_one_line_naming_the_key_and_exit_2(tmp_path, capsys, overrides, key):
    from k2_megatron.training.pretrain import main

    overrides = [o.replace("{corpus}", _corpus_prefix()) if "{corpus}" in o else o for o in overrides]
    status = main([f"output.dir={tmp_path / 'run'}", *TINY_RUN, *QUIET, *overrides])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("k2-pretrain: ") and key in lines[0], err
    assert "Traceback" not in err and not dist.is_initialized()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # a run that stops at startup gives its lock back


def test_the_layout_is_checked_before_any_process_group(monkeypatch):
    """The layout against the world size comes first (megatron's initialize_model_parallel would raise on every
    rank, NCCL's path has no check of its own): a ConfigError naming the key, and nothing left initialised."""
    from k2_megatron.training.trainer import initialize_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: two ranks cannot hold TP4
    with pytest.raises(ConfigError, match=r"world size 2 is not divisible by parallel.tensor"):
        initialize_distributed(load_config(None, ["parallel.tensor=4"]))
    assert not dist.is_initialized()


def test_a_lone_process_leaves_no_gloo_store_file(tmp_path, monkeypatch):
    """A single process without torchrun used to rendezvous through a file it made in /tmp and never removed
    (one /tmp/k2_gloo_* per run); on a failure the process group stayed initialised too."""
    import tempfile

    from k2_megatron.megatron import init_distributed_cpu, teardown_distributed_cpu

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    init_distributed_cpu(ParallelLayout())
    assert dist.get_world_size() == 1
    teardown_distributed_cpu()
    with pytest.raises(ValueError, match="world size 1 is not divisible"):
        init_distributed_cpu(ParallelLayout(tensor_parallel=2))
    assert not dist.is_initialized()
    assert os.listdir(scratch) == []


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_directory(tmp_path, capsys, monkeypatch):
    """ENOSPC while the second checkpoint's tensors are written: one line naming the errno, the file and what is
    left (exit status 1: not a config error); the partial .tmp-iter_0000002 is removed, latest keeps step 1."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from k2_megatron.checkpoint.megatron import latest_checkpoint
    from k2_megatron.training.pretrain import main

    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron reads its signature
    def disk_full_at_step_2(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if ".tmp-iter_0000002" in stream.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", disk_full_at_step_2)
    run = tmp_path / "run"
    status = main([f"output.dir={run}", *TINY_RUN, *QUIET[:2], "train.iters=3", "checkpoint.save_interval=1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1, err
    assert len(lines) == 1, err
    root = run / "checkpoints"
    assert lines[0].startswith("k2-pretrain: CheckpointSaveError: the save of step 2 failed: rank 0: [Errno 28] No "
                               f"space left on device (writing {root / '.tmp-iter_0000002'}/"), lines[0]
    assert f"{root / 'latest'} still names iter_0000001" in lines[0]
    assert glob.glob(str(root / ".tmp-*")) == []
    assert latest_checkpoint(str(root)) == str(root / "iter_0000001")
