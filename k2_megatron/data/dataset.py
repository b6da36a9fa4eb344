"""Training and validation sample streams on megatron-core's GPTDataset, and the unigram baseline.

Datasets: ``build_pretraining_datasets`` runs megatron-core's ``BlendedMegatronDatasetBuilder`` over
``GPTDataset`` (its C++ index helpers ship in the 0.19.2 wheel and run on CPU) with one blend per split: the
training split from the training prefixes, the validation split from the held-out prefixes. GPTDataset packs
documents (each ending with the eod id) into ``seq_length + 1``-token windows, shuffles documents and samples
with ``numpy.random.RandomState(seed)``, and caches its index files under ``path_to_cache`` (in a distributed
run rank 0 builds them and the other ranks load them: call it on every rank).

Sampling: ``SampleStream`` reads the dataset's samples in index order (the shuffle is inside GPTDataset),
megatron's pretraining-sampler layout: each micro-batch step takes ``micro_batch_size * dp_size`` consecutive
samples, rank r the r-th slice. Its whole state is ``consumed_samples`` (global, identical on every rank), so
``state_dict()``/``load_state_dict()`` resume exactly, mid-epoch, and a changed data-parallel size continues
with the same global sample order. ``dataset_hash`` (megatron's hash of the dataset definition) catches a
resume against different data, seed or sequence length.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from k2_megatron.data.tokenizer import TextTokenizer

DEFAULT_SEED = 1234


class DatasetExhaustedError(RuntimeError):
    """A SampleStream was asked for samples beyond the end of its dataset."""


def _stat_tokens(prefix: str, dtype: np.dtype) -> int:
    """Tokens of an indexed file from the size of its .bin (no read)."""
    return os.path.getsize(prefix + ".bin") // dtype.itemsize


def resolve_blend(name: str, prefixes: str | Sequence[str], weights: Sequence[float] | None = None, *,
                  weighted: bool = True, weights_name: str = "weights") -> tuple[list[str], list[float] | None]:
    """(indexed files, weights) of one split, each dataset prefix (PREFIX.bin/.idx, or a sharded PREFIX.shards/)
    expanded into its files, each file checked against megatron-core's limits (reads 34 bytes per file).

    Without sharded prefixes the prefixes and weights come back as given. With some, a file's weight is its
    prefix's weight (default: the prefix's tokens) times its share of the prefix's tokens, so the shards of one
    dataset blend as that dataset would (``weighted=False``, for a split read in one pass: no weights).
    """
    from k2_megatron.data.indexed import check_blend_size, check_indexed_dataset, dataset_shards, is_sharded

    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
    if not prefixes:
        raise ValueError(f"{name}: at least one indexed-dataset prefix is needed")
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(f"{weights_name}: {len(weights)} weights for {len(prefixes)} prefixes of {name}")
    files, file_weights = [], []
    for i, prefix in enumerate(prefixes):
        try:
            shards = dataset_shards(prefix)
            headers = [check_indexed_dataset(s.prefix) for s in shards]
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: no indexed dataset at {prefix!r} (expected {prefix}.bin and "
                                    f"{prefix}.idx, or a sharded dataset {prefix}.shards/; make them with "
                                    "tools/preprocess_data.py)") from None
        tokens = [s.tokens if s.tokens is not None else _stat_tokens(s.prefix, h.dtype)
                  for s, h in zip(shards, headers)]
        total = sum(tokens)
        share = weights[i] if weights is not None else total
        files += [s.prefix for s in shards]
        file_weights += [share * t / total for t in tokens]
    check_blend_size(name, len(files))
    if not any(is_sharded(p) for p in prefixes):
        return files, list(weights) if weights is not None else None
    return files, file_weights if weighted else None


def _check_sizes(seq_length: int, train_samples: int, valid_samples: int | None) -> None:
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"seq_length: must be a positive int, got {seq_length!r}")
    if not isinstance(train_samples, int) or train_samples < 1:
        raise ValueError(f"train_samples: must be a positive int, got {train_samples!r}")
    if valid_samples is not None and (not isinstance(valid_samples, int) or valid_samples < 1):
        raise ValueError(f"valid_samples: must be None or a positive int, got {valid_samples!r}")


def split_blends(train_prefixes, valid_prefixes, train_weights) -> list:
    """megatron's ``blend_per_split`` (train, valid, test) for these prefixes."""
    blends = [resolve_blend("train_prefixes", train_prefixes, train_weights, weights_name="train_weights"), None,
              None]
    if valid_prefixes is not None:
        blends[1] = resolve_blend("valid_prefixes", valid_prefixes, weighted=False)
    return blends


def build_megatron_datasets(tokenizer: TextTokenizer, seq_length: int, blends: list, sizes: list, *, seed: int,
                            path_to_cache: str, is_built_on_rank: Callable[[], bool] | None = None,
                            fast_cache_load: bool = False):
    """(train, valid) from megatron-core's BlendedMegatronDatasetBuilder over GPTDataset; the one place their
    config is made. ``fast_cache_load``: megatron's mode that only loads indices found in ``path_to_cache``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend_per_split=blends, tokenizer=tokenizer,
        path_to_cache=path_to_cache, fast_cache_load=fast_cache_load,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    train, valid, _ = builder.build()
    return train, valid


def build_pretraining_datasets(tokenizer: TextTokenizer, seq_length: int, train_prefixes: str | Sequence[str],
                               valid_prefixes: str | Sequence[str] | None = None, *, train_samples: int,
                               valid_samples: int | None = None, train_weights: Sequence[float] | None = None,
                               seed: int = DEFAULT_SEED, path_to_cache: str,
                               is_built_on_rank: Callable[[], bool] | None = None):
    """(train, valid) megatron GPTDatasets (or BlendedDatasets for several weighted prefixes); valid is None
    without ``valid_prefixes``.

    A prefix is an indexed dataset (PREFIX.bin/.idx) or a sharded one (PREFIX.shards/, blended by tokens, see
    ``resolve_blend``). ``train_samples``: samples the run will draw (train_iters * global_batch_size);
    GPTDataset repeats epochs (each reshuffled) to cover it. ``valid_samples``: None for one pass over the
    held-out data. Samples are dicts of 1-D tensors: tokens, labels (tokens shifted by one), loss_mask,
    position_ids. ``path_to_cache``: where megatron caches the indices (every rank must see it: rank 0 writes,
    the others read), keyed on a hash of the dataset definition that includes ``train_samples``. Must be called
    on every rank of a distributed run. The indices are built here when not cached (by rank 0, in time that
    grows with the data): for large data build them offline and load them with
    ``dataset_index.load_dataset_index``.
    """
    _check_sizes(seq_length, train_samples, valid_samples)
    blends = split_blends(train_prefixes, valid_prefixes, train_weights)
    train, valid = build_megatron_datasets(tokenizer, seq_length, blends, [train_samples, valid_samples, None],
                                           seed=seed, is_built_on_rank=is_built_on_rank, path_to_cache=path_to_cache)
    if train is not None and len(train) < train_samples:
        raise RuntimeError(f"train_samples: the training dataset holds {len(train)} samples, fewer than the "
                           f"{train_samples} requested")
    return train, valid


def collate_samples(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stacks the samples' tensors: tokens/labels/position_ids [b, s] int64, loss_mask [b, s] float32."""
    if not samples:
        raise ValueError("samples: cannot collate an empty list")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


class SampleStream:
    """Deterministic, resumable micro-batches of one data-parallel rank from a megatron dataset.

    Micro-batch step k (global, counting from the start of training) covers dataset indices
    [consumed, consumed + micro_batch_size * dp_size) with consumed = k * micro_batch_size * dp_size; this rank
    gets slice [dp_rank * micro_batch_size, (dp_rank + 1) * micro_batch_size) of it.
    """

    def __init__(self, dataset, micro_batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0):
        if dataset is None:
            raise ValueError("dataset: None (was it built on this rank?)")
        for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("dp_size", dp_size, 1),
                                 ("consumed_samples", consumed_samples, 0), ("dp_rank", dp_rank, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
        if dp_rank >= dp_size:
            raise ValueError(f"dp_rank: must be < dp_size={dp_size}, got {dp_rank}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def samples_per_step(self) -> int:
        """Samples one micro-batch step takes over all data-parallel ranks."""
        return self.micro_batch_size * self.dp_size

    @property
    def dataset_hash(self) -> str:
        return getattr(self.dataset, "unique_description_hash", type(self.dataset).__name__)

    def __len__(self) -> int:
        """Micro-batch steps left before the dataset runs out."""
        return (len(self.dataset) - self.consumed_samples) // self.samples_per_step

    def _check_available(self, consumed_samples: int) -> None:
        end = consumed_samples + self.samples_per_step
        if end > len(self.dataset):
            raise DatasetExhaustedError(f"the dataset holds {len(self.dataset)} samples; the step at consumed_samples="
                                f"{consumed_samples} needs {end} (build it with more train_samples)")

    def batch_at(self, consumed_samples: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch of the step starting at ``consumed_samples`` (no state change)."""
        self._check_available(consumed_samples)
        start = consumed_samples + self.dp_rank * self.micro_batch_size
        return collate_samples([self.dataset[i] for i in range(start, start + self.micro_batch_size)])

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch of this rank; advances ``consumed_samples`` by ``micro_batch_size * dp_size``."""
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.samples_per_step
        return batch

    def skip_batch(self) -> None:
        """Advances past the next micro-batch without reading it (a pipeline stage that consumes no data)."""
        self._check_available(self.consumed_samples)
        self.consumed_samples += self.samples_per_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.consumed_samples + self.samples_per_step <= len(self.dataset):
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "dataset_hash": self.dataset_hash,
                "dataset_len": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"consumed_samples", "dataset_hash"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)} (got {sorted(state)})")
        if state["dataset_hash"] != self.dataset_hash:
            raise ValueError(f"state: saved for dataset {state['dataset_hash']} (len {state.get('dataset_len')}), "
                             f"but this stream reads {self.dataset_hash} (len {len(self.dataset)}): the data, "
                             "tokenizer, seed, sequence length or sample count changed since the checkpoint")
        consumed = state["consumed_samples"]
        if not isinstance(consumed, int) or not 0 <= consumed <= len(self.dataset):
            raise ValueError(f"state: consumed_samples must be an int in [0, {len(self.dataset)}], got {consumed!r}")
        self.consumed_samples = consumed


def validation_batches(dataset, micro_batch_size: int, num_micro_batches: int | None = None, *,
                       dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out micro-batches of this rank, always from the start: the same samples at every evaluation.
    ``num_micro_batches``: None for as many as fit in one pass."""
    stream = SampleStream(dataset, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    available = len(stream)
    if num_micro_batches is None:
        num_micro_batches = available
    elif num_micro_batches > available:
        raise ValueError(f"num_micro_batches: the validation set has {len(dataset)} samples, enough for "
                         f"{available} micro-batches of {micro_batch_size} x dp {dp_size}, not {num_micro_batches}")
    for _ in range(num_micro_batches):
        yield stream.next_batch()


# The unigram baseline's reads of a dataset without stored token counts: at most this many tokens, in this
# many evenly spaced windows.
UNIGRAM_SAMPLE_TOKENS = 1 << 24
UNIGRAM_SAMPLE_WINDOWS = 256
_READ_CHUNK_TOKENS = 1 << 22


def _token_windows(total: int, budget: int, windows: int) -> list[tuple[int, int]]:
    """(start, length) windows of [0, total): the whole range when it fits ``budget``, else ``windows`` evenly
    spaced windows of ``budget // windows`` tokens."""
    if total <= budget:
        return [(start, min(_READ_CHUNK_TOKENS, total - start)) for start in range(0, total, _READ_CHUNK_TOKENS)]
    length = max(1, budget // windows)
    windows = min(windows, budget)
    last = total - length
    return [(round(k * last / max(windows - 1, 1)), length) for k in range(windows)]


def token_counts(prefix: str, vocab_size: int, *, max_sample_tokens: int = UNIGRAM_SAMPLE_TOKENS
                 ) -> tuple[np.ndarray, bool]:
    """(counts of each id, int64 [vocab_size]; exact) of the dataset at ``prefix``.

    The counts the preprocessing stored beside the dataset (``PREFIX.token_counts.npy``, or the sharded
    dataset's ``token_counts.npy``) when there are some: exact, one small file read. Otherwise counted on at
    most ``max_sample_tokens`` tokens read from the .bin files in ``UNIGRAM_SAMPLE_WINDOWS`` evenly spaced
    windows (exact only when the dataset is no larger): a bounded read whatever the dataset's size.
    """
    from k2_megatron.data.indexed import check_indexed_dataset, dataset_shards, token_counts_path

    path = token_counts_path(prefix)
    if path is not None:
        counts = np.load(path)
        if counts.shape != (vocab_size,) or counts.dtype.kind not in "iu":
            raise ValueError(f"vocab_size: {path} holds {counts.dtype} counts of shape {list(counts.shape)}, not "
                             f"[vocab_size={vocab_size}] (was the dataset made with another tokenizer?)")
        return counts.astype(np.int64), True
    files = [(s.prefix, check_indexed_dataset(s.prefix).dtype) for s in dataset_shards(prefix)]
    sizes = np.array([_stat_tokens(p, dtype) for p, dtype in files], dtype=np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start, length in _token_windows(total, max_sample_tokens, UNIGRAM_SAMPLE_WINDOWS):
        i = int(np.searchsorted(ends, start, side="right"))  # the file holding token ``start``
        (file, dtype), offset = files[i], start - int(ends[i] - sizes[i])
        with open(file + ".bin", "rb") as f:
            f.seek(offset * dtype.itemsize)
            part = np.fromfile(f, dtype=dtype, count=min(length, int(sizes[i]) - offset))
        if part.size and int(part.max()) >= vocab_size:
            raise ValueError(f"vocab_size: {file} holds token id {int(part.max())} >= vocab_size={vocab_size}")
        counts += np.bincount(part, minlength=vocab_size)
    return counts, total <= max_sample_tokens


def unigram_baseline(train_prefixes: str | Sequence[str], valid_prefixes: str | Sequence[str], vocab_size: int,
                     *, smoothing: float = 1.0, max_sample_tokens: int = UNIGRAM_SAMPLE_TOKENS) -> float:
    """Cross-entropy in nats per token of the held-out data under the training split's unigram distribution.

    p(t) = (count_train(t) + smoothing) / (N_train + smoothing * vocab_size) (additive smoothing, so a token
    absent from training costs a finite amount); returns -mean over every held-out token of log p(t), eod ids
    included (they are predicted targets in training too). A language model that learned anything beyond
    token frequencies has a validation loss below this.

    Reads a bounded amount of data whatever the datasets' size (``token_counts``): the counts stored by the
    preprocessing (exact), else at most ``max_sample_tokens`` tokens of each dataset (an estimate).
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: must be a positive int, got {vocab_size!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing: must be > 0, got {smoothing}")
    counts = {}
    for name, prefixes in (("train_prefixes", train_prefixes), ("valid_prefixes", valid_prefixes)):
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        resolve_blend(name, prefixes, weighted=False)  # every dataset there, within megatron's limits
        counts[name] = sum(token_counts(p, vocab_size, max_sample_tokens=max_sample_tokens)[0] for p in prefixes)
    train_counts, valid_counts = counts["train_prefixes"], counts["valid_prefixes"]
    n_valid = int(valid_counts.sum())
    if n_valid == 0:
        raise ValueError("valid_prefixes: the held-out data holds no tokens")
    log_p = np.log(train_counts + smoothing) - np.log(train_counts.sum() + smoothing * vocab_size)
    return float(-(valid_counts * log_p).sum() / n_valid)
