"""What a run checks at startup, before it builds the model (``Trainer.setup``): the directories it will write.
Without these checks an unwritable ``checkpoint.dir`` is found at the first save, after the training it was meant to
keep. Each failure is a ConfigError naming the key, raised on every rank (they check together)."""

from __future__ import annotations

import os
import tempfile

import torch.distributed as dist

from k2_megatron.config import ConfigError, PretrainConfig


def _writable_dir_problem(key: str, path: str) -> str | None:
    """None if ``path`` is (or can be made) a directory this process can write a file into; else a line naming
    ``key``. Leaves the directory, but not the probe file."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".k2_write_probe_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{key}={path!r}: not a writable directory ({e.strerror}: {e.filename})"
    return None


def _paths_to_write(cfg: PretrainConfig, checkpoint_root: str, rank: int) -> list[tuple[str, str]]:
    """(key, directory) this rank writes: rank 0 the logs and megatron's dataset indices (those only when it builds
    them: without data.index_dir); every rank its checkpoint files. A key left null names its default's path."""
    paths = []
    if rank == 0:
        paths.append(("output.dir", cfg.output.dir))
        if cfg.data.index_dir is None:
            paths.append(("data.cache_dir", cfg.dataset_cache_dir()))
    return paths + [("checkpoint.dir", checkpoint_root)]


def _checkpoint_load_problem(cfg: PretrainConfig, checkpoint_root: str) -> str | None:
    """checkpoint.load must exist when this run has no checkpoint of its own to resume (then it is read)."""
    load = cfg.checkpoint.load
    has_own = cfg.checkpoint.resume and os.path.exists(os.path.join(checkpoint_root, "latest"))
    if load and not has_own and not os.path.isdir(load):
        return f"checkpoint.load={load!r}: no checkpoint there (no such directory)"
    return None


def check_paths(cfg: PretrainConfig, checkpoint_root: str) -> None:
    """Collective: ConfigError on every rank if any rank cannot write a directory the run writes, or
    checkpoint.load names nothing."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    problem = _checkpoint_load_problem(cfg, checkpoint_root)
    for key, path in _paths_to_write(cfg, checkpoint_root, rank):
        problem = problem or _writable_dir_problem(key, path)
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    for r, p in enumerate(problems):
        if p is not None:
            raise ConfigError(p if r == rank else f"rank {r}: {p}")


__all__ = ["check_paths"]
