"""Raw text / JSON lines -> megatron-core indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``).

One sequence per document: the document's token ids followed by the tokenizer's end-of-document id. Token dtype
uint16 when the vocabulary fits (< 65500 ids), else int32 (megatron-core's ``DType.optimal_dtype``). Files are
written under temporary names and renamed (.bin first, .idx last), so a prefix whose .idx exists is complete.
``tools/preprocess_data.py`` is the command-line front end.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from k2_megatron.data.tokenizer import TextTokenizer, default_cache_dir, default_tokenizer

INPUT_FORMATS = ("auto", "jsonl", "text")
_COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def _open_text(path: str):
    opener = _COMPRESSED.get(os.path.splitext(path)[1], open)
    return opener(path, "rt", encoding="utf-8")


def _format_of(path: str, input_format: str) -> str:
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format: must be one of {INPUT_FORMATS}, got {input_format!r}")
    if input_format != "auto":
        return input_format
    stem = path[: -len(os.path.splitext(path)[1])] if os.path.splitext(path)[1] in _COMPRESSED else path
    return "jsonl" if stem.endswith((".jsonl", ".json", ".ndjson")) else "text"


def iter_documents(paths: str | Iterable[str], *, json_key: str = "text", input_format: str = "auto"
                   ) -> Iterator[str]:
    """Yields the documents of the input files, in order.

    ``jsonl`` (.jsonl/.json/.ndjson, auto-detected): one JSON object per line, the document is ``obj[json_key]``.
    ``text`` (anything else): each file is one document. .xz/.gz/.bz2 files are decompressed on the fly.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("paths: no input files given")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"paths: no such input file {path!r}")
    for path in paths:
        fmt = _format_of(path, input_format)
        with _open_text(path) as f:
            if fmt == "text":
                yield f.read()
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    raise ValueError(f"{path}:{lineno}: expected an object with key json_key={json_key!r}, "
                                     f"got {str(obj)[:80]!r}")
                if not isinstance(obj[json_key], str):
                    raise ValueError(f"{path}:{lineno}: {json_key!r} must be a string, got "
                                     f"{type(obj[json_key]).__name__}")
                yield obj[json_key]


@dataclass
class IndexedDatasetStats:
    path_prefix: str
    documents: int
    tokens: int
    skipped_empty: int
    dtype: str


def write_indexed_dataset(documents: Iterable[str], tokenizer: TextTokenizer, output_prefix: str, *,
                          append_eod: bool = True, batch_size: int = 64) -> IndexedDatasetStats:
    """Tokenizes ``documents`` into the indexed dataset ``output_prefix`` (.bin/.idx); empty documents are skipped.

    Returns counts. An existing dataset at ``output_prefix`` is replaced.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path

    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_prefix = os.path.join(out_dir, f".tmp-{os.getpid()}-{os.path.basename(output_prefix)}")
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda texts: [tokenizer.encode(t) for t in texts])
    n_docs = n_tokens = skipped = 0

    def flush(batch):
        nonlocal n_docs, n_tokens
        for ids in encode_batch(batch):
            if append_eod:
                ids = [*ids, tokenizer.eod]
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)

    try:
        batch = []
        for text in documents:
            if not text:
                skipped += 1
                continue
            batch.append(text)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        builder.finalize(get_idx_path(tmp_prefix))
        if n_docs == 0:
            raise ValueError(f"documents: nothing to write to {output_prefix!r} (all {skipped} documents empty)")
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(path):
                os.unlink(path)
    return IndexedDatasetStats(output_prefix, n_docs, n_tokens, skipped, np.dtype(dtype).name)


def preprocess_files(inputs: str | Iterable[str], tokenizer: TextTokenizer, output_prefix: str, *,
                     json_key: str = "text", input_format: str = "auto", append_eod: bool = True
                     ) -> IndexedDatasetStats:
    """``iter_documents`` + ``write_indexed_dataset``: what ``tools/preprocess_data.py`` runs."""
    return write_indexed_dataset(iter_documents(inputs, json_key=json_key, input_format=input_format), tokenizer,
                                 output_prefix, append_eod=append_eod)


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
