"""Indexed datasets (tools/preprocess_data.py), deterministic resumable sample streams, the unigram baseline."""

import importlib.util
import gzip
import json
import math
import os

import numpy as np
import pytest
import torch

from k2_megatron.data import corpus_texts
from k2_megatron.data import dataset as ds
from k2_megatron.data import preprocess as pp
from k2_megatron.data.tokenizer import TextTokenizer, train_bpe_tokenizer

from tests.helpers import REPO_ROOT

SEQ = 64


class CharTokenizer(TextTokenizer):
    """One id per code point, eod = the last id: a tokenizer whose ids a test can write down by hand."""

    name = "chars"

    def __init__(self, vocab_size):
        self._vocab_size = vocab_size

    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(chr(i) for i in self._check_ids(ids))

    @property
    def vocab_size(self):
        return self._vocab_size

    @property
    def eod(self):
        return self._vocab_size - 1

    @property
    def unique_identifiers(self):
        return {"class": "CharTokenizer", "vocab_size": self._vocab_size}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe_tokenizer(corpus_texts("train")[:3], 512, str(tmp_path_factory.mktemp("tok") / "tok.json"))


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory, bpe):
    out = tmp_path_factory.mktemp("indexed")
    train = pp.write_indexed_dataset(corpus_texts("train")[:4], bpe, str(out / "train"))
    valid = pp.write_indexed_dataset(corpus_texts("valid")[:1], bpe, str(out / "valid"))
    return train.path_prefix, valid.path_prefix


def _build(bpe, prefixes, cache, train_samples=6000, seed=ds.DEFAULT_SEED):
    return ds.build_pretraining_datasets(bpe, SEQ, prefixes[0], prefixes[1], train_samples=train_samples, seed=seed,
                                         path_to_cache=str(cache))


def _load_tool():
    path = os.path.join(REPO_ROOT, "tools", "preprocess_data.py")
    spec = importlib.util.spec_from_file_location("preprocess_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preprocess_tool_end_to_end(tmp_path, bpe, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["First document.\nWith two lines.", "", "Second: 'tis naught but 1234 words", "Third; ünïcödé 中文 too"]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:3]:
            f.write(json.dumps({"content": d, "meta": 1}) + "\n")
        f.write("\n")  # blank lines are ignored
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[3])
    prefix = str(tmp_path / "out" / "corpus")
    _load_tool().main(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt.gz"), "--json-key", "content",
                       "--tokenizer", f"bpe:{bpe.path}", "--output-prefix", prefix])
    report = json.loads(capsys.readouterr().out)
    assert (report["documents"], report["skipped_empty"], report["dtype"]) == (3, 1, "uint16")
    data = IndexedDataset(prefix)
    expected = [bpe.encode(d) + [bpe.eod] for d in docs if d]
    assert len(data) == 3 and report["tokens"] == sum(map(len, expected))
    for i, ids in enumerate(expected):
        assert data[i].dtype == np.uint16 and data[i].tolist() == ids
        assert bpe.decode(data[i].tolist()[:-1]) == [d for d in docs if d][i]
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx"]  # no temporary files left


def test_preprocess_dtype_and_eod_options(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    wide = CharTokenizer(70_000)  # more ids than uint16 holds
    (tmp_path / "t.txt").write_text("中文 ok", encoding="utf-8")
    stats = pp.preprocess_files([str(tmp_path / "t.txt")], wide, str(tmp_path / "w"))
    data = IndexedDataset(str(tmp_path / "w"))  # keep it alive: its items are views of its memory map
    assert stats.dtype == "int32" and data[0].tolist() == [20013, 25991, 32, 111, 107, 69_999]
    stats = pp.preprocess_files(str(tmp_path / "t.txt"), CharTokenizer(30_000), str(tmp_path / "n"), append_eod=False)
    data = IndexedDataset(str(tmp_path / "n"))
    assert stats.dtype == "uint16" and data[0].tolist() == [20013, 25991, 32, 111, 107]


def test_preprocess_errors(tmp_path):
    tok = CharTokenizer(300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        pp.preprocess_files(str(bad), tok, str(tmp_path / "x"))
    bad.write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected an object with key json_key='text'"):
        pp.preprocess_files(str(bad), tok, str(tmp_path / "x"))
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="must be a string"):
        pp.preprocess_files(str(bad), tok, str(tmp_path / "x"))
    bad.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="nothing to write"):
        pp.preprocess_files(str(bad), tok, str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="no such input file"):
        pp.preprocess_files(str(tmp_path / "missing.txt"), tok, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="input_format"):
        list(pp.iter_documents(str(bad), input_format="csv"))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # failed runs leave nothing behind


def test_samples_are_deterministic(tmp_path, bpe, prefixes):
    train, valid = _build(bpe, prefixes, tmp_path / "c1")
    again, _ = _build(bpe, prefixes, tmp_path / "c2")  # rebuilt from scratch in another cache
    other_seed, _ = _build(bpe, prefixes, tmp_path / "c3", seed=7)
    assert len(train) >= 6000 and len(valid) > 10
    for i in (0, 1, 17, 5999):
        a, b = train[i], again[i]
        assert set(a) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert a["tokens"].shape == (SEQ,) and torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["labels"][:-1], a["tokens"][1:])  # next-token targets
        assert torch.equal(a["position_ids"], torch.arange(SEQ)) and bool((a["loss_mask"] == 1).all())
    assert not all(torch.equal(train[i]["tokens"], other_seed[i]["tokens"]) for i in range(4))
    # 6000 samples is more than one epoch of these 4 plays: GPTDataset repeats (reshuffled) epochs to cover it
    samples_per_epoch = (int(train.dataset.sequence_lengths.sum()) - 1) // SEQ  # train.dataset: the IndexedDataset
    assert samples_per_epoch < 6000 <= len(train)


def test_stream_resumes_exactly_mid_epoch(tmp_path, bpe, prefixes):
    train, _ = _build(bpe, prefixes, tmp_path / "c")
    stream = ds.SampleStream(train, micro_batch_size=3)
    for _ in range(7):
        stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))  # plain data: fits any checkpoint
    assert state["consumed_samples"] == 21
    expected = [stream.next_batch() for _ in range(5)]
    restarted, _ = _build(bpe, prefixes, tmp_path / "c")  # a new process: the datasets rebuilt from the cache
    resumed = ds.SampleStream(restarted, micro_batch_size=3)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert got["tokens"].shape == (3, SEQ) and got["tokens"].dtype == torch.int64
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert resumed.consumed_samples == stream.consumed_samples == 36


def test_stream_data_parallel_layout(tmp_path, bpe, prefixes):
    train, _ = _build(bpe, prefixes, tmp_path / "c")
    single = ds.SampleStream(train, micro_batch_size=4)
    ranks = [ds.SampleStream(train, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next_batch()["tokens"]
        assert torch.equal(torch.cat([r.next_batch()["tokens"] for r in ranks]), whole)
    # a checkpoint of the 1-rank run resumes on 2 ranks with the same global sample order
    resumed = [ds.SampleStream(train, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(single.state_dict())
    whole = single.next_batch()["tokens"]
    assert torch.equal(torch.cat([r.next_batch()["tokens"] for r in resumed]), whole)
    assert len(single) == (len(train) - single.consumed_samples) // 4


def test_stream_errors(tmp_path, bpe, prefixes):
    train, _ = _build(bpe, prefixes, tmp_path / "c")
    other, _ = _build(bpe, prefixes, tmp_path / "c", seed=99)
    stream = ds.SampleStream(train, 2)
    with pytest.raises(ValueError, match="seed, sequence length or sample count changed"):
        ds.SampleStream(other, 2).load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="consumed_samples"):
        stream.load_state_dict({**stream.state_dict(), "consumed_samples": len(train) + 1})
    with pytest.raises(ValueError, match="missing keys"):
        stream.load_state_dict({"consumed_samples": 0})
    stream.load_state_dict({**stream.state_dict(), "consumed_samples": len(train) - 1})
    with pytest.raises(ds.DatasetExhaustedError, match="more train_samples"):
        stream.next_batch()
    assert list(stream) == []
    for kwargs, match in ((dict(micro_batch_size=0), "micro_batch_size"), (dict(dp_rank=2, dp_size=2), "dp_rank"),
                          (dict(consumed_samples=-1), "consumed_samples")):
        with pytest.raises(ValueError, match=match):
            ds.SampleStream(train, **{"micro_batch_size": 2, **kwargs})


def test_validation_batches(tmp_path, bpe, prefixes):
    _, valid = _build(bpe, prefixes, tmp_path / "c")
    first = list(ds.validation_batches(valid, 4, 3))
    second = list(ds.validation_batches(valid, 4, 3))
    assert len(first) == 3 and all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(first, second))
    everything = list(ds.validation_batches(valid, 4))
    assert len(everything) == len(valid) // 4
    with pytest.raises(ValueError, match="num_micro_batches"):
        list(ds.validation_batches(valid, 4, len(valid)))


def test_build_errors(tmp_path, bpe, prefixes):
    with pytest.raises(FileNotFoundError, match="train_prefixes"):
        ds.build_pretraining_datasets(bpe, SEQ, str(tmp_path / "nope"), train_samples=10)
    with pytest.raises(ValueError, match="seq_length"):
        ds.build_pretraining_datasets(bpe, 0, prefixes[0], train_samples=10)
    with pytest.raises(ValueError, match="train_samples"):
        ds.build_pretraining_datasets(bpe, SEQ, prefixes[0], train_samples=0)
    with pytest.raises(ValueError, match="train_weights"):
        ds.build_pretraining_datasets(bpe, SEQ, prefixes[0], train_samples=10, train_weights=[0.5, 0.5])


def test_unigram_baseline_by_hand(tmp_path):
    tok = CharTokenizer(101)  # ids: ord(ch); eod = 100
    train = pp.write_indexed_dataset(["aab", "abc"], tok, str(tmp_path / "train")).path_prefix
    valid = pp.write_indexed_dataset(["abd"], tok, str(tmp_path / "valid")).path_prefix
    # train counts: a=3, b=2, c=1, eod=2 (N=8); valid tokens: a, b, d (unseen), eod
    count = {ord("a"): 3, ord("b"): 2, ord("c"): 1, 100: 2}
    for smoothing in (1.0, 0.1):
        def p(i):
            return (count.get(i, 0) + smoothing) / (8 + smoothing * 101)

        expected = -(math.log(p(ord("a"))) + math.log(p(ord("b"))) + math.log(p(ord("d"))) + math.log(p(100))) / 4
        assert ds.unigram_baseline(train, valid, 101, smoothing=smoothing) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="vocab_size"):
        ds.unigram_baseline(train, valid, 50)  # ids up to 100 do not fit
    with pytest.raises(ValueError, match="smoothing"):
        ds.unigram_baseline(train, valid, 101, smoothing=0.0)


def test_unigram_baseline_of_corpus_is_below_uniform(bpe, prefixes):
    baseline = ds.unigram_baseline(*prefixes, bpe.vocab_size)
    assert 3.0 < baseline < math.log(bpe.vocab_size)


def test_prepare_corpus_data_builds_once(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from k2_megatron.data import corpus

    full = corpus.iter_corpus_documents

    def first_two(split):  # two documents per split keep the test fast; the code path is the full one
        return (doc for i, doc in enumerate(full(split)) if i < 2)

    monkeypatch.setattr(corpus, "iter_corpus_documents", first_two)
    data = pp.prepare_corpus_data(vocab_size=512, cache_dir=str(tmp_path))
    assert data.tokenizer.vocab_size == 512 and data.train_prefix.startswith(str(tmp_path))
    train, valid = IndexedDataset(data.train_prefix), IndexedDataset(data.valid_prefix)
    assert (len(train), len(valid)) == (2, 2)  # one sequence per document
    assert train[0][-1] == valid[0][-1] == data.tokenizer.eod
    assert data.tokenizer.decode(valid[1][:-1].tolist()) == corpus_texts("valid")[1]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached indexed datasets should have been reused")

    monkeypatch.setattr(pp, "write_indexed_dataset", no_rebuild)
    again = pp.prepare_corpus_data(vocab_size=512, cache_dir=str(tmp_path))
    assert (again.train_prefix, again.valid_prefix) == (data.train_prefix, data.valid_prefix)
    with pytest.raises(ValueError, match="vocab_size"):
        pp.prepare_corpus_data(data.tokenizer, vocab_size=1024, cache_dir=str(tmp_path))


def test_package_exports():
    import k2_megatron.data as data

    assert data.SampleStream is ds.SampleStream and data.prepare_corpus_data is pp.prepare_corpus_data
    assert set(data.__all__) >= {"SampleStream", "build_pretraining_datasets", "unigram_baseline", "load_tokenizer",
                                 "write_indexed_dataset", "validation_batches", "iter_corpus_documents"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        data.nope
