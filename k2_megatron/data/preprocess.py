"""Raw text / JSON lines -> megatron-core indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``).

One sequence per document: the document's token ids followed by the tokenizer's end-of-document id. Token dtype
uint16 when the vocabulary fits (< 65500 ids), else int32 (megatron-core's ``DType.optimal_dtype``). Files are
written under temporary names and renamed (.bin first, .idx last), so a prefix whose .idx exists is complete;
``PREFIX.token_counts.npy`` beside it holds each id's count (for the unigram baseline). Memory stays bounded
whatever the number of documents (``indexed.IndexedDatasetWriter``).

- ``preprocess_files``: every input into one indexed file (refused past ``max_documents``).
- ``preprocess_sharded``: one indexed file per input file (split into parts of at most ``max_documents``),
  ``workers`` processes in parallel, published together as the sharded dataset ``PREFIX.shards/``
  (``indexed.dataset_shards`` reads it; the training data functions take PREFIX for either form).

``tools/preprocess_data.py`` is the command-line front end.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from k2_megatron.data.indexed import (MANIFEST_NAME, MAX_DOCUMENTS_PER_FILE, SHARDED_FORMAT, TOKEN_COUNTS_SUFFIX,
                                      IndexedDatasetWriter, is_sharded, shards_dir, token_dtype)
from k2_megatron.data.tokenizer import TextTokenizer, default_cache_dir, default_tokenizer

INPUT_FORMATS = ("auto", "jsonl", "text")
_COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
# what a corrupt or truncated compressed stream raises
_STREAM_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


def _format_of(path: str, input_format: str) -> str:
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format: must be one of {INPUT_FORMATS}, got {input_format!r}")
    if input_format != "auto":
        return input_format
    stem = path[: -len(os.path.splitext(path)[1])] if os.path.splitext(path)[1] in _COMPRESSED else path
    return "jsonl" if stem.endswith((".jsonl", ".json", ".ndjson")) else "text"


def _check_inputs(paths: str | Iterable[str]) -> list[str]:
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("paths: no input files given")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such input file")
    return paths


def _decode(path: str, data: bytes, lineno: int | None = None) -> str:
    """UTF-8 text of ``data``; a bad byte is a ValueError naming the file, line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = lineno if lineno is not None else data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column "
                         f"{exc.start - line_start + 1})") from None


def _json_document(path: str, lineno: int, line: str, json_key: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or json_key not in obj:
        raise ValueError(f"{path}:{lineno}: expected an object with key json_key={json_key!r}, "
                         f"got {str(obj)[:80]!r}")
    if not isinstance(obj[json_key], str):
        raise ValueError(f"{path}:{lineno}: {json_key!r} must be a string, got {type(obj[json_key]).__name__}")
    return obj[json_key]


def _iter_file_documents(path: str, fmt: str, json_key: str) -> Iterator[str]:
    opener = _COMPRESSED.get(os.path.splitext(path)[1], open)
    lineno = 0
    try:
        with opener(path, "rb") as f:
            if fmt == "text":  # the whole file, newlines translated as text mode would (\r\n and \r -> \n)
                yield _decode(path, f.read()).replace("\r\n", "\n").replace("\r", "\n")
                return
            for lineno, raw in enumerate(f, 1):
                line = _decode(path, raw, lineno)
                if line.strip():
                    yield _json_document(path, lineno, line, json_key)
    except _STREAM_ERRORS as exc:
        where = f" after line {lineno}" if lineno else ""
        raise ValueError(f"{path}: cannot read{where}: {exc}") from None


def iter_documents(paths: str | Iterable[str], *, json_key: str = "text", input_format: str = "auto"
                   ) -> Iterator[str]:
    """Yields the documents of the input files, in order.

    ``jsonl`` (.jsonl/.json/.ndjson, auto-detected): one JSON object per line, the document is ``obj[json_key]``.
    ``text`` (anything else): each file is one document. .xz/.gz/.bz2 files are decompressed on the fly. Bad
    input (a missing file, invalid UTF-8 or JSON, a corrupt compressed stream) is a one-line error naming the
    file (and line).
    """
    paths = _check_inputs(paths)
    for path in paths:
        yield from _iter_file_documents(path, _format_of(path, input_format), json_key)


@dataclass
class IndexedDatasetStats:
    path_prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    dtype: str


class _DocumentEncoder:
    """Token id arrays of non-empty documents (eod appended), tokenized ``batch_size`` at a time; counts the
    empty documents it skips."""

    def __init__(self, tokenizer: TextTokenizer, *, append_eod: bool = True, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.tokenizer, self.append_eod, self.batch_size = tokenizer, append_eod, batch_size
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.skipped_empty = 0
        self._encode_batch = (getattr(tokenizer, "encode_batch", None)
                              or (lambda texts: [tokenizer.encode(t) for t in texts]))

    def __call__(self, documents: Iterable[str]) -> Iterator[np.ndarray]:
        batch = []
        for text in documents:
            if not text:
                self.skipped_empty += 1
                continue
            batch.append(text)
            if len(batch) == self.batch_size:
                yield from self._encode(batch)
                batch = []
        if batch:
            yield from self._encode(batch)

    def _encode(self, batch: list[str]) -> Iterator[np.ndarray]:
        for ids in self._encode_batch(batch):
            if self.append_eod:
                ids = [*ids, self.tokenizer.eod]
            yield np.asarray(ids, dtype=self.dtype)


def write_indexed_dataset(documents: Iterable[str], tokenizer: TextTokenizer, output_prefix: str, *,
                          append_eod: bool = True, batch_size: int = 64,
                          max_documents: int = MAX_DOCUMENTS_PER_FILE) -> IndexedDatasetStats:
    """Tokenizes ``documents`` into the indexed dataset ``output_prefix`` (.bin/.idx, + .token_counts.npy);
    empty documents are skipped. More than ``max_documents`` documents (at most megatron-core's int32 limit)
    raise DatasetLimitError and write nothing: use ``preprocess_sharded`` for more. Returns counts. An existing
    dataset at ``output_prefix`` is replaced; a sharded one there is refused."""
    _refuse_other_form(output_prefix, sharded=False)
    encoder = _DocumentEncoder(tokenizer, append_eod=append_eod, batch_size=batch_size)
    with IndexedDatasetWriter(output_prefix, encoder.dtype, vocab_size=tokenizer.vocab_size,
                              max_documents=max_documents) as writer:
        for ids in encoder(documents):
            writer.add(ids)
        if writer.documents == 0:
            raise ValueError(f"documents: nothing to write to {output_prefix!r} (all {encoder.skipped_empty} "
                             "documents empty)")
        writer.commit()
    return IndexedDatasetStats(output_prefix, writer.documents, writer.tokens, encoder.skipped_empty,
                               encoder.dtype.name)


def preprocess_files(inputs: str | Iterable[str], tokenizer: TextTokenizer, output_prefix: str, *,
                     json_key: str = "text", input_format: str = "auto", append_eod: bool = True,
                     max_documents: int = MAX_DOCUMENTS_PER_FILE) -> IndexedDatasetStats:
    """``iter_documents`` + ``write_indexed_dataset``: every input into one indexed file."""
    return write_indexed_dataset(iter_documents(inputs, json_key=json_key, input_format=input_format), tokenizer,
                                 output_prefix, append_eod=append_eod, max_documents=max_documents)


def _refuse_other_form(prefix: str, *, sharded: bool) -> None:
    """Writing one form of dataset (single file or sharded) over the other would leave both at ``prefix``."""
    if sharded and os.path.exists(prefix + ".idx"):
        raise FileExistsError(f"{prefix}.idx: an indexed dataset is at this prefix; remove it (or choose another "
                              "--output-prefix) before writing a sharded one there")
    if not sharded and is_sharded(prefix):
        raise FileExistsError(f"{shards_dir(prefix)}: a sharded dataset is at this prefix; remove it (or choose "
                              "another --output-prefix) before writing a single indexed file there")


# ----- sharded preprocessing: one indexed file per input file, in worker processes -----

@dataclass
class ShardedDatasetStats:
    path_prefix: str
    shards: int
    documents: int
    tokens: int
    skipped_empty: int
    dtype: str
    workers: int
    seconds: float
    tokens_per_second: float          # tokens / wall-clock seconds of the whole run
    worker_tokens_per_second: float   # mean over inputs of tokens / seconds of the process that wrote it
    tokens_per_cpu_second: float      # tokens / CPU seconds of the workers: a process's rate on a free core
    inputs: list = field(default_factory=list, repr=False)


@dataclass
class _ShardJob:
    index: int
    path: str
    staging: str
    input_format: str
    json_key: str
    append_eod: bool
    max_documents: int


_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _write_input_shards(job: _ShardJob, tokenizer: TextTokenizer | None = None) -> dict:
    """Tokenizes one input file into ``<staging>/<index>-<part>`` indexed files of at most max_documents each."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    t0, cpu0 = time.perf_counter(), time.process_time()
    encoder = _DocumentEncoder(tokenizer, append_eod=job.append_eod)
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    shards, writer = [], None

    def publish():
        writer.commit()
        counts[:] += writer.token_counts
        shards.append({"name": os.path.basename(writer.prefix), "input": job.path, "documents": writer.documents,
                       "tokens": writer.tokens})

    documents = _iter_file_documents(job.path, _format_of(job.path, job.input_format), job.json_key)
    try:
        for ids in encoder(documents):
            if writer is not None and writer.full:
                publish()
                writer = None
            if writer is None:
                prefix = os.path.join(job.staging, f"{job.index:05d}-{len(shards):03d}")
                writer = IndexedDatasetWriter(prefix, encoder.dtype, vocab_size=tokenizer.vocab_size,
                                              max_documents=job.max_documents)
            writer.add(ids)
        if writer is not None:
            publish()
    finally:
        if writer is not None:
            writer.abort()
    for shard in shards:  # the sum over the dataset is stored once; per-shard counts are not kept
        os.unlink(os.path.join(job.staging, shard["name"] + TOKEN_COUNTS_SUFFIX))
    return {"index": job.index, "input": job.path, "shards": shards, "skipped_empty": encoder.skipped_empty,
            "token_counts": counts, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


def _run_jobs(jobs: list[_ShardJob], tokenizer: TextTokenizer, workers: int) -> Iterator[dict]:
    """Results of the jobs as they finish: in this process for one worker, else in ``workers`` spawned
    processes (each with its own copy of the tokenizer); the first error stops the others."""
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    if workers == 1:
        for job in jobs:
            yield _write_input_shards(job, tokenizer)
        return
    # one thread per process: the parallelism is over input files (tokenizers' own threads would oversubscribe)
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    try:
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(tokenizer,))
        pending = {executor.submit(_write_input_shards, job): job for job in jobs}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                job = pending.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    raise RuntimeError(f"a worker process exited abruptly (killed, out of memory?) while tokenizing "
                                       f"{job.path} or another of the {len(pending) + 1} unfinished inputs") from None
    finally:
        for process in list(getattr(executor, "_processes", {}).values()):  # stop the others' work now
            process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)


def preprocess_sharded(inputs: str | Iterable[str], tokenizer: TextTokenizer, output_prefix: str, *,
                       workers: int = 1, max_documents: int = MAX_DOCUMENTS_PER_FILE, json_key: str = "text",
                       input_format: str = "auto", append_eod: bool = True,
                       progress: Callable[[dict, int, int], None] | None = None) -> ShardedDatasetStats:
    """Tokenizes each input file into its own indexed file(s) (parts of at most ``max_documents`` documents),
    ``workers`` processes in parallel, and publishes them as the sharded dataset ``PREFIX.shards/``
    (manifest.json, token_counts.npy, the shards ``NNNNN-PPP.{bin,idx}`` in input order).

    Everything is written into a temporary directory beside it that replaces an existing ``PREFIX.shards/``
    only when every input succeeded; on an error nothing is left behind. ``progress(result, done, total)`` is
    called as each input finishes. Memory per process is bounded (one batch of documents, the writer's buffers).
    """
    paths = _check_inputs(inputs)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be an int >= 1, got {workers!r}")
    if not 1 <= max_documents <= MAX_DOCUMENTS_PER_FILE:
        raise ValueError(f"max_documents: must be in [1, {MAX_DOCUMENTS_PER_FILE}], got {max_documents}")
    for path in paths:
        _format_of(path, input_format)
    _refuse_other_form(output_prefix, sharded=True)
    final = shards_dir(output_prefix)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".tmp-{os.getpid()}-{os.path.basename(final)}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    t0 = time.perf_counter()
    try:
        jobs = [_ShardJob(k, os.path.abspath(p), staging, input_format, json_key, append_eod, max_documents)
                for k, p in enumerate(paths)]
        results = []
        for result in _run_jobs(jobs, tokenizer, min(workers, len(jobs))):
            results.append(result)
            if progress is not None:
                progress(result, len(results), len(jobs))
        results.sort(key=lambda r: r["index"])
        shards = [s for r in results for s in r["shards"]]
        if not shards:
            raise ValueError(f"inputs: nothing to write to {output_prefix!r} (every document of the "
                             f"{len(paths)} inputs is empty)")
        seconds = time.perf_counter() - t0
        stats = ShardedDatasetStats(
            output_prefix, len(shards), sum(s["documents"] for s in shards), sum(s["tokens"] for s in shards),
            sum(r["skipped_empty"] for r in results), token_dtype(tokenizer.vocab_size).name,
            min(workers, len(jobs)), seconds, 0.0, 0.0, 0.0, [{k: v for k, v in r.items() if k != "token_counts"}
                                                             for r in results])
        stats.tokens_per_second = stats.tokens / max(seconds, 1e-9)
        stats.worker_tokens_per_second = float(np.mean([sum(s["tokens"] for s in r["shards"]) / max(r["seconds"], 1e-9)
                                                        for r in results]))
        stats.tokens_per_cpu_second = stats.tokens / max(sum(r["cpu_seconds"] for r in results), 1e-9)
        np.save(os.path.join(staging, "token_counts.npy"), sum(r["token_counts"] for r in results))
        manifest = {"format": SHARDED_FORMAT, "version": 1, "tokenizer": tokenizer.unique_identifiers,
                    "dtype": stats.dtype, "documents": stats.documents, "tokens": stats.tokens,
                    "skipped_empty": stats.skipped_empty, "shards": shards}
        with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return stats


def _replace_dir(new: str, final: str) -> None:
    """Moves directory ``new`` to ``final``, replacing an existing one (renames, then deletes the old one)."""
    old = None
    if os.path.exists(final):
        old = os.path.join(os.path.dirname(final), f".old-{os.getpid()}-{os.path.basename(final)}")
        os.rename(final, old)
    os.rename(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class PreparedData:
    """A tokenizer and the train / held-out indexed datasets made with it."""

    tokenizer: TextTokenizer
    train_prefix: str
    valid_prefix: str


def prepare_corpus_data(tokenizer: TextTokenizer | None = None, *, vocab_size: int | None = None,
                        cache_dir: str | None = None) -> PreparedData:
    """The bundled corpus as indexed datasets, built once and cached under
    ``<cache_dir>/data/shakespeare-<corpus hash>-<tokenizer name>/{train,valid}``.

    With no tokenizer, the default BPE (``default_tokenizer(vocab_size or 4096)``) is trained or loaded. Safe to
    call from several processes at once (each file is published by an atomic rename), though then each may
    redo the work; in a distributed run call it on rank 0 first, then barrier.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from k2_megatron.data.corpus import corpus_fingerprint, iter_corpus_documents

    cache_dir = cache_dir or default_cache_dir()
    if tokenizer is None:
        tokenizer = default_tokenizer(vocab_size, cache_dir) if vocab_size else default_tokenizer(cache_dir=cache_dir)
    elif vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ValueError(f"vocab_size: {vocab_size} disagrees with the tokenizer's {tokenizer.vocab_size}")
    out_dir = os.path.join(cache_dir, "data", f"shakespeare-{corpus_fingerprint()}-{tokenizer.name}")
    prefixes = {}
    for split in ("train", "valid"):
        prefix = os.path.join(out_dir, split)
        if not IndexedDataset.exists(prefix):
            write_indexed_dataset((d["text"] for d in iter_corpus_documents(split)), tokenizer, prefix)
        prefixes[split] = prefix
    return PreparedData(tokenizer, prefixes["train"], prefixes["valid"])
