"""megatron-core's GPT dataset indices built offline, so that a training job's startup only reads them.

GPTDataset and BlendedDataset index every sample (document, sample and shuffle indices, blending indices) and
cache them under a hash of the dataset definition that includes the sample count. Built at startup, that is
rank 0 working in time that grows with the data while every other rank waits (at K2's 3.77e9 samples: tens of
minutes, past NCCL's timeout), and a changed ``train.iters`` changes the hash and rebuilds everything. Here:

- ``build_dataset_index`` (``tools/preprocess_data.py build-index``) builds them once, in one process, into
  ``<index_dir>/<key>/samples-<N>/``: ``<key>`` hashes everything that defines the samples except how many
  (tokenizer, sequence length, seed, the indexed files with their sizes, the weights, the validation sample
  count, megatron-core's version), N is the number of training samples. An index of at least N samples already
  there is reused as it is. Everything is built in a temporary directory renamed into place at the end, with
  ``index.json`` (what was built, every file and its size) written last.
- ``load_dataset_index`` loads the smallest index there that covers the samples a run needs (or exactly the
  one a checkpoint was trained on) with megatron's ``fast_cache_load``: it memory-maps the .npy files and
  builds nothing; the files listed in index.json are checked first. Without one it raises DatasetIndexError
  naming the directory and the command that builds it.

A run on an index built for N >= train_samples draws its first train_samples samples, in the order of N: the
order does not change when a run is extended within N (a resume checks it through the dataset hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from k2_megatron.data.dataset import DEFAULT_SEED, _check_sizes, build_megatron_datasets, split_blends
from k2_megatron.data.tokenizer import BPETokenizer, TextTokenizer, TiktokenTokenizer

INDEX_FORMAT = 1
INDEX_INFO = "index.json"
DEFINITION = "definition.json"
_SAMPLES_DIR = re.compile(r"^samples-(\d+)$")


class DatasetIndexError(RuntimeError):
    """No usable prebuilt dataset index (the message names the directory and the command that builds one)."""


@dataclass(frozen=True)
class DatasetIndex:
    path: str                   # the directory of megatron's index files
    train_samples: int          # training samples it was built for
    train_length: int           # samples of the training dataset (>= train_samples)
    valid_length: int | None
    built: bool                 # False when an existing index covered the request


def _absolute(blends: list) -> list:
    """megatron keys its files on the dataset paths as given: the same absolute paths for build and load."""
    return [None if b is None else ([os.path.abspath(f) for f in b[0]], b[1]) for b in blends]


def _definition(tokenizer: TextTokenizer, seq_length: int, blends: list, seed: int,
                valid_samples: int | None) -> dict:
    from megatron.core.package_info import __version__ as megatron_version

    def split(blend):
        if blend is None:
            return None
        files, weights = blend
        return {"files": [[f, os.path.getsize(f + ".bin"), os.path.getsize(f + ".idx")] for f in files],
                "weights": weights}

    return {"format": INDEX_FORMAT, "megatron_core": megatron_version,
            "tokenizer": tokenizer.unique_identifiers, "seq_length": seq_length, "seed": seed,
            "train": split(blends[0]), "valid": split(blends[1]), "valid_samples": valid_samples}


def _key_dir(index_dir: str, definition: dict) -> str:
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(os.path.abspath(index_dir), digest)


def _built_indices(key_dir: str) -> list[tuple[int, str]]:
    """(training samples, directory) of the complete indices under ``key_dir``, fewest samples first."""
    if not os.path.isdir(key_dir):
        return []
    found = []
    for name in os.listdir(key_dir):
        m = _SAMPLES_DIR.match(name)
        if m and os.path.isfile(os.path.join(key_dir, name, INDEX_INFO)):
            found.append((int(m.group(1)), os.path.join(key_dir, name)))
    return sorted(found)


def _read_info(path: str) -> dict:
    try:
        with open(os.path.join(path, INDEX_INFO), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetIndexError(f"{path}: unreadable {INDEX_INFO}: {exc}") from None


def _index_of(path: str, info: dict, built: bool) -> DatasetIndex:
    return DatasetIndex(path, info["train_samples"], info["train_length"], info["valid_length"], built)


def _write_json_atomic(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def build_dataset_index(tokenizer: TextTokenizer, seq_length: int, train_prefixes: str | Sequence[str],
                        valid_prefixes: str | Sequence[str] | None = None, *, train_samples: int, index_dir: str,
                        train_weights: Sequence[float] | None = None, valid_samples: int | None = None,
                        seed: int = DEFAULT_SEED) -> DatasetIndex:
    """Builds megatron's GPT dataset indices for ``train_samples`` training samples (and the validation split)
    into ``index_dir``, unless an index of at least that many samples of the same data is there already.

    Arguments as ``build_pretraining_datasets``. Runs in this process (no torch.distributed): run it offline,
    once, on a machine that sees the shared ``index_dir`` (``tools/preprocess_data.py build-index``).
    """
    _check_sizes(seq_length, train_samples, valid_samples)
    blends = _absolute(split_blends(train_prefixes, valid_prefixes, train_weights))
    definition = _definition(tokenizer, seq_length, blends, seed, valid_samples)
    key_dir = _key_dir(index_dir, definition)
    for samples, path in _built_indices(key_dir):
        if samples >= train_samples:
            return _index_of(path, _read_info(path), built=False)
    os.makedirs(key_dir, exist_ok=True)
    _write_json_atomic(os.path.join(key_dir, DEFINITION), definition)  # for people: what these indices are of
    final = os.path.join(key_dir, f"samples-{train_samples}")
    staging = os.path.join(key_dir, f".tmp-samples-{train_samples}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        train, valid = build_megatron_datasets(tokenizer, seq_length, blends, [train_samples, valid_samples, None],
                                               seed=seed, path_to_cache=staging)
        if len(train) < train_samples:
            raise DatasetIndexError(f"train_samples: the training data make {len(train)} samples, fewer than the "
                                    f"{train_samples} requested")
        info = {"definition": definition, "train_samples": train_samples, "train_length": len(train),
                "valid_length": None if valid is None else len(valid),
                "files": {name: os.path.getsize(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}}
        _write_json_atomic(os.path.join(staging, INDEX_INFO), info)
        if os.path.exists(final):  # built meanwhile by another process: keep that one
            shutil.rmtree(staging)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _index_of(final, _read_info(final), built=True)


def tokenizer_spec(tokenizer: TextTokenizer) -> str:
    """A ``--tokenizer`` spec that loads this tokenizer (for messages), or a placeholder."""
    if isinstance(tokenizer, BPETokenizer):
        return f"bpe:{tokenizer.path}"
    if isinstance(tokenizer, TiktokenTokenizer):
        return f"tiktoken:{tokenizer.path}"
    return "<your data.tokenizer>"


def build_index_command(tokenizer: TextTokenizer, seq_length: int, train_prefixes, valid_prefixes, *,
                        train_samples: int, index_dir: str, train_weights=None, valid_samples=None,
                        seed: int = DEFAULT_SEED) -> str:
    """The ``tools/preprocess_data.py build-index`` command line that builds this index."""
    def listed(values):
        return " ".join(str(v) for v in ([values] if isinstance(values, str) else values))

    parts = ["python tools/preprocess_data.py build-index", f"--tokenizer {tokenizer_spec(tokenizer)}",
             f"--seq-length {seq_length}", f"--train-prefix {listed(train_prefixes)}"]
    if train_weights is not None:
        parts.append(f"--train-weights {listed(train_weights)}")
    if valid_prefixes is not None:
        parts.append(f"--valid-prefix {listed(valid_prefixes)}")
    if valid_samples is not None:
        parts.append(f"--valid-samples {valid_samples}")
    parts += [f"--train-samples {train_samples}", f"--seed {seed}", f"--index-dir {index_dir}"]
    return " ".join(parts)


def _check_files(path: str, info: dict, command: str) -> None:
    problems = []
    for name, size in info.get("files", {}).items():
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            problems.append(f"{name} ({'missing' if actual is None else f'{actual} bytes, expected {size}'})")
    if problems or not info.get("files"):
        raise DatasetIndexError(f"{path}: the prebuilt dataset index is damaged: {', '.join(problems) or 'no files'}"
                                f"; remove the directory and rebuild it with: {command}")


def load_dataset_index(tokenizer: TextTokenizer, seq_length: int, train_prefixes: str | Sequence[str],
                       valid_prefixes: str | Sequence[str] | None = None, *, train_samples: int, index_dir: str,
                       train_weights: Sequence[float] | None = None, valid_samples: int | None = None,
                       seed: int = DEFAULT_SEED, built_samples: int | None = None,
                       is_built_on_rank: Callable[[], bool] | None = None):
    """(train, valid) datasets from a prebuilt index in ``index_dir``, building nothing (call it on every rank).

    Takes the index of the fewest samples >= ``train_samples`` (``built_samples``: exactly the index built for
    that many, e.g. the one a checkpoint was trained on, so that a resume keeps its sample order). Startup cost:
    a header read per indexed file, a stat per index file, memory maps; independent of the data's size.
    DatasetIndexError, naming the directory and the build command, when no index covers the request.
    """
    _check_sizes(seq_length, train_samples, valid_samples)
    blends = _absolute(split_blends(train_prefixes, valid_prefixes, train_weights))
    definition = _definition(tokenizer, seq_length, blends, seed, valid_samples)
    key_dir = _key_dir(index_dir, definition)
    available = _built_indices(key_dir)
    wanted = train_samples if built_samples is None else max(built_samples, train_samples)
    command = build_index_command(tokenizer, seq_length, train_prefixes, valid_prefixes, train_samples=wanted,
                                  index_dir=index_dir, train_weights=train_weights, valid_samples=valid_samples,
                                  seed=seed)
    usable = [(n, p) for n, p in available
              if n >= train_samples and (built_samples is None or n == built_samples)]
    if not usable:
        found = ", ".join(f"samples-{n}" for n, _ in available) or "none"
        need = (f"the index built for {built_samples} samples" if built_samples is not None
                else f"an index of at least {train_samples} training samples")
        raise DatasetIndexError(f"{key_dir}: no prebuilt dataset index for these data ({need}; found: {found}). "
                                f"Build it offline with: {command}")
    samples, path = usable[0]
    info = _read_info(path)
    if info.get("definition") != definition or info.get("train_samples") != samples:
        raise DatasetIndexError(f"{path}: its {INDEX_INFO} describes other data than this run's; remove the "
                                f"directory and rebuild it with: {command}")
    _check_files(path, info, command)
    train, valid = build_megatron_datasets(tokenizer, seq_length, blends, [samples, valid_samples, None], seed=seed,
                                           path_to_cache=path, is_built_on_rank=is_built_on_rank,
                                           fast_cache_load=True)
    if train is not None and len(train) != info["train_length"]:
        raise DatasetIndexError(f"{path}: the index holds {len(train)} training samples, its {INDEX_INFO} says "
                                f"{info['train_length']}; rebuild it with: {command}")
    return train, valid
