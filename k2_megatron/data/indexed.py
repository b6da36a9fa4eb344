"""megatron-core's indexed dataset files: a streaming writer, O(1) header reads, the limits of megatron's
index builders, and sharded datasets (one indexed dataset per input file, listed in a manifest).

File format (megatron-core 0.19 ``indexed_dataset.py``, one sequence per document): ``PREFIX.bin`` holds the
token ids back to back; ``PREFIX.idx`` holds a header (``MMIDIDX\\x00\\x00``, version 1 as <Q, dtype code <B,
sequence count <Q, document count <Q), then the sequence lengths (int32), the sequence byte offsets (int64)
and the document boundaries 0, 1, ..., n (int64). ``PREFIX.token_counts.npy`` (int64 [vocab_size], written
beside by ``IndexedDatasetWriter``) holds how often each id occurs, so that nothing needs to count them again.

Limits: megatron-core 0.19 stores document ids as int32 (``gpt_dataset._build_document_index`` casts them with
``astype(numpy.int32)``; the builder makes ``numpy.arange(..., dtype=numpy.int32)`` over them): a file of more
than 2^31 - 1 documents wraps to negative ids silently. Sequence lengths are int32 in the .idx. A blend indexes
its datasets with int16 (``BlendedDataset``: ``numpy.zeros(size, dtype=numpy.int16)``, fewer than 32767
asserted). ``check_indexed_dataset`` and ``check_blend_size`` refuse what is past these limits; the writer
refuses to write it.

A sharded dataset at PREFIX is the directory ``PREFIX.shards/`` holding ``manifest.json`` (the shards in order
with their document and token counts), ``token_counts.npy`` (the sum over the shards) and the shards
``NNNNN-PPP.{bin,idx}`` (input file NNNNN, part PPP). ``dataset_shards(prefix)`` resolves either form.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

# megatron-core 0.19's limits (see the module docstring)
MAX_DOCUMENTS_PER_FILE = 2**31 - 1
MAX_DOCUMENT_TOKENS = 2**31 - 1
MAX_BLEND_DATASETS = 2**15 - 2   # BlendedDataset asserts len(datasets) < 32767

INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")
# megatron-core's DType codes (indexed_dataset.DType)
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
TOKEN_COUNTS_SUFFIX = ".token_counts.npy"
SHARDS_SUFFIX = ".shards"
MANIFEST_NAME = "manifest.json"
SHARDED_FORMAT = "k2_megatron sharded indexed dataset"


class DatasetLimitError(ValueError):
    """An indexed dataset holds (or would hold) more than megatron-core's int32/int16 indices can address."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (megatron-core's ``DType.optimal_dtype``: < 65500 ids), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    sequences: int
    documents: int   # document boundaries (sequences + 1 for one sequence per document)


def read_index_header(prefix: str) -> IndexHeader:
    """The header of ``PREFIX.idx`` (34 bytes read, whatever the dataset's size)."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path}: truncated index header ({len(raw)} of {_HEADER.size} bytes)")
    magic, version, code, sequences, documents = _HEADER.unpack(raw)
    if magic != INDEX_HEADER or version != 1 or code not in _CODE_DTYPES:
        raise ValueError(f"{path}: not a megatron-core indexed dataset index (magic {magic!r}, version {version}, "
                         f"dtype code {code})")
    return IndexHeader(_CODE_DTYPES[code], sequences, documents)


def check_document_count(where: str, documents: int) -> None:
    """DatasetLimitError when one indexed file holds more documents than megatron-core's int32 ids address."""
    if documents > MAX_DOCUMENTS_PER_FILE:
        raise DatasetLimitError(
            f"{where}: {documents} documents in one indexed file; megatron-core 0.19 numbers documents with int32 "
            f"(at most {MAX_DOCUMENTS_PER_FILE}) and would wrap the rest to negative ids. Shard the data: "
            "tools/preprocess_data.py --workers N writes one indexed file per input file, each split below "
            "--max-documents")


def check_blend_size(where: str, datasets: int) -> None:
    """DatasetLimitError when a blend has more datasets than megatron-core's int16 dataset index addresses."""
    if datasets > MAX_BLEND_DATASETS:
        raise DatasetLimitError(
            f"{where}: a blend of {datasets} indexed files; megatron-core 0.19 numbers the datasets of a blend with "
            f"int16 (at most {MAX_BLEND_DATASETS}). Use fewer, larger shards (fewer input files per "
            "tools/preprocess_data.py run, or concatenate input files)")


def check_indexed_dataset(prefix: str) -> IndexHeader:
    """The header of an indexed dataset, after checking that its files exist and megatron-core can index it."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"no indexed dataset at {prefix!r}: {prefix + suffix} is missing (make it with "
                                    "tools/preprocess_data.py)")
    header = read_index_header(prefix)
    check_document_count(prefix + ".idx", header.sequences)
    return header


class IndexedDatasetWriter:
    """Writes one indexed dataset (PREFIX.bin + PREFIX.idx, byte-identical to megatron-core's
    ``IndexedDatasetBuilder`` with one ``add_document`` per document) in memory bounded by its buffers, not by
    the number of documents: the sequence lengths go to a temporary file as they come, the offsets and document
    boundaries are computed from it in chunks at ``commit``.

    Files are written under temporary names and renamed at ``commit`` (.bin, token counts, then .idx last), so a
    prefix whose .idx exists is complete; ``abort`` (or an exception inside ``with``) removes them. With
    ``vocab_size``, ids are checked against it and counted into ``PREFIX.token_counts.npy``.
    """

    def __init__(self, prefix: str, dtype, *, vocab_size: int | None = None, write_token_counts: bool = True,
                 max_documents: int = MAX_DOCUMENTS_PER_FILE, buffer_tokens: int = 1 << 22,
                 buffer_documents: int = 1 << 20):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _DTYPE_CODES or not np.issubdtype(self.dtype, np.integer):
            raise ValueError(f"dtype: {self.dtype} is not an integer indexed-dataset dtype")
        if not 1 <= max_documents <= MAX_DOCUMENTS_PER_FILE:
            raise ValueError(f"max_documents: must be in [1, {MAX_DOCUMENTS_PER_FILE}], got {max_documents}")
        self.vocab_size = vocab_size
        self.max_documents = max_documents
        self.documents = 0
        self.tokens = 0
        self.token_counts = np.zeros(vocab_size, np.int64) if vocab_size is not None and write_token_counts else None
        out_dir = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(out_dir, exist_ok=True)
        self._tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{os.path.basename(prefix)}")
        self._token_buffer = np.empty(buffer_tokens, self.dtype)
        self._buffered_tokens = 0
        self._length_buffer = np.empty(buffer_documents, np.int32)
        self._buffered_lengths = 0
        self._bin = open(self._tmp + ".bin", "wb")
        self._lengths = open(self._tmp + ".lengths", "w+b")
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    @property
    def full(self) -> bool:
        return self.documents >= self.max_documents

    def add(self, ids) -> None:
        """Appends one document (a 1-D sequence of token ids)."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids: expected a 1-D sequence of token ids, got shape {ids.shape}")
        if self.full:
            raise DatasetLimitError(f"{self.prefix}: already holds max_documents={self.max_documents} documents")
        if ids.size > MAX_DOCUMENT_TOKENS:
            raise DatasetLimitError(f"{self.prefix}: a document of {ids.size} tokens; megatron-core stores sequence "
                                    f"lengths as int32 (at most {MAX_DOCUMENT_TOKENS})")
        if ids.size:
            high = self.vocab_size if self.vocab_size is not None else np.iinfo(self.dtype).max + 1
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= high:
                raise ValueError(f"{self.prefix}: token id {lo if lo < 0 else hi} outside [0, {high}) in document "
                                 f"{self.documents}")
        tokens = ids.astype(self.dtype, copy=False)
        if self._buffered_tokens + tokens.size > self._token_buffer.size:
            self._flush_tokens()
        if tokens.size > self._token_buffer.size:
            self._write_tokens(tokens)
        else:
            self._token_buffer[self._buffered_tokens:self._buffered_tokens + tokens.size] = tokens
            self._buffered_tokens += tokens.size
        self._length_buffer[self._buffered_lengths] = tokens.size
        self._buffered_lengths += 1
        if self._buffered_lengths == self._length_buffer.size:
            self._flush_lengths()
        self.documents += 1
        self.tokens += tokens.size

    def _write_tokens(self, tokens: np.ndarray) -> None:
        self._bin.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        if self.token_counts is not None:
            self.token_counts += np.bincount(tokens, minlength=self.vocab_size)

    def _flush_tokens(self) -> None:
        if self._buffered_tokens:
            self._write_tokens(self._token_buffer[:self._buffered_tokens])
            self._buffered_tokens = 0

    def _flush_lengths(self) -> None:
        if self._buffered_lengths:
            self._lengths.write(memoryview(self._length_buffer[:self._buffered_lengths]).cast("B"))
            self._buffered_lengths = 0

    def _length_chunks(self):
        """The sequence lengths from the temporary file, one buffer at a time."""
        self._lengths.seek(0)
        while True:
            raw = self._lengths.read(self._length_buffer.nbytes)
            if not raw:
                return
            yield np.frombuffer(raw, np.int32)

    def _write_index(self, path: str) -> None:
        itemsize = self.dtype.itemsize
        with open(path, "wb") as f:
            f.write(_HEADER.pack(INDEX_HEADER, 1, _DTYPE_CODES[self.dtype], self.documents, self.documents + 1))
            for lengths in self._length_chunks():
                f.write(memoryview(lengths).cast("B"))
            offset = 0
            for lengths in self._length_chunks():
                nbytes = lengths.astype(np.int64) * itemsize
                ends = np.cumsum(nbytes) + offset
                f.write(memoryview(ends - nbytes).cast("B"))
                offset = int(ends[-1])
            step = self._length_buffer.size
            for start in range(0, self.documents + 1, step):
                f.write(memoryview(np.arange(start, min(start + step, self.documents + 1), dtype=np.int64)).cast("B"))

    def commit(self) -> None:
        """Writes the index and publishes the files under ``prefix``; an existing dataset there is replaced."""
        try:
            if self.documents == 0:
                raise ValueError(f"{self.prefix}: nothing to write (no documents)")
            self._flush_tokens()
            self._flush_lengths()
            self._bin.close()
            self._write_index(self._tmp + ".idx")
            os.replace(self._tmp + ".bin", self.prefix + ".bin")
            counts_path = self.prefix + TOKEN_COUNTS_SUFFIX
            if self.token_counts is not None:
                save_npy_atomic(counts_path, self.token_counts)
            elif os.path.exists(counts_path):
                os.unlink(counts_path)  # stale counts of a dataset this one replaces
            os.replace(self._tmp + ".idx", self.prefix + ".idx")
        finally:
            self.abort()

    def abort(self) -> None:
        """Closes and removes the temporary files (the published ones stay)."""
        if self._done:
            return
        self._done = True
        for f in (self._bin, self._lengths):
            f.close()
        for suffix in (".bin", ".idx", ".lengths"):
            if os.path.exists(self._tmp + suffix):
                os.unlink(self._tmp + suffix)


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----- sharded datasets -----

def shards_dir(prefix: str) -> str:
    return prefix + SHARDS_SUFFIX


def read_manifest(prefix: str) -> dict:
    """The manifest of the sharded dataset at ``prefix`` (``PREFIX.shards/manifest.json``)."""
    path = os.path.join(shards_dir(prefix), MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT or \
            not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
        raise ValueError(f"{path}: not a sharded-dataset manifest (format {SHARDED_FORMAT!r} with a list of shards)")
    return manifest


@dataclass(frozen=True)
class Shard:
    prefix: str
    tokens: int | None    # from the manifest; None for a plain indexed dataset (not read: it costs O(documents))


def dataset_shards(prefix: str) -> list[Shard]:
    """The indexed files of the dataset at ``prefix``: itself (PREFIX.bin/.idx) or the shards its
    ``PREFIX.shards/manifest.json`` lists. FileNotFoundError when neither exists, ValueError when both do."""
    single, sharded = os.path.isfile(prefix + ".idx"), is_sharded(prefix)
    if single and sharded:
        raise ValueError(f"{prefix!r}: both an indexed dataset ({prefix}.idx) and a sharded one "
                         f"({shards_dir(prefix)}/) are there; remove one")
    if single or not sharded:
        return [Shard(prefix, None)]  # a missing dataset is reported by check_indexed_dataset
    manifest = read_manifest(prefix)
    return [Shard(os.path.join(shards_dir(prefix), s["name"]), int(s["tokens"])) for s in manifest["shards"]]


def is_sharded(prefix: str) -> bool:
    return os.path.isfile(os.path.join(shards_dir(prefix), MANIFEST_NAME))


def token_counts_path(prefix: str) -> str | None:
    """Where the token counts of the dataset at ``prefix`` are stored, or None if they are not."""
    path = os.path.join(shards_dir(prefix), "token_counts.npy") if is_sharded(prefix) else prefix + TOKEN_COUNTS_SUFFIX
    return path if os.path.isfile(path) else None
