"""The corpus bundled with the package: public-domain Shakespeare, split by document into train and held-out.

Files: ``k2_megatron/data/corpus/{train,valid}.jsonl.xz`` (one JSON object per line per document, fields
``id``, ``title``, ``source_url``, ``text``), generated once by ``tools/make_corpus.py``; source and licence
in ``k2_megatron/data/corpus/README.md``. The held-out split is whole documents (``HELD_OUT_DOCUMENTS``), so no
passage of a validation play is ever trained on.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from collections.abc import Iterator

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
SPLIT_FILES = {"train": "train.jsonl.xz", "valid": "valid.jsonl.xz"}
# One tragedy, one comedy, one history, one romance: ~10% of the characters.
HELD_OUT_DOCUMENTS = ("macbeth", "twelfth_night", "richard_ii", "winters_tale")


def corpus_path(split: str) -> str:
    """Path of the bundled corpus file of ``split`` ("train" or "valid")."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    path = os.path.join(CORPUS_DIR, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the bundled corpus file {path} is missing: the package was installed without its data files "
            "(install from the repository, or regenerate with tools/make_corpus.py)")
    return path


def iter_corpus_documents(split: str) -> Iterator[dict]:
    """Yields the documents of a split in file order: dicts with id, title, source_url, text."""
    with lzma.open(corpus_path(split), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def corpus_texts(split: str) -> list[str]:
    """The texts of a split's documents, in file order."""
    return [doc["text"] for doc in iter_corpus_documents(split)]


def corpus_fingerprint() -> str:
    """A short hash of both corpus files: the cache key of everything derived from the corpus."""
    h = hashlib.sha256()
    for split in sorted(SPLIT_FILES):
        with open(corpus_path(split), "rb") as f:
            h.update(split.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]
