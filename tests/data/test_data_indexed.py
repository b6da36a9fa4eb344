"""Indexed datasets (tools/preprocess_data.py), deterministic resumable sample streams, the unigram baseline;
megatron's int32 limits, sharded preprocessing in worker processes, bounded memory and bounded startup reads."""

import importlib.util
import gzip
import json
import math
import os
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from tests.helpers.data import bpe, bytes_touched, needs_proc_accounting, write_jsonl  # noqa: F401 (bpe: a fixture)
from k2_megatron.data import corpus_texts
from k2_megatron.data import dataset as ds
from k2_megatron.data import indexed as ix
from k2_megatron.data import preprocess as pp
from k2_megatron.data.tokenizer import TextTokenizer

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
    # no temporary files left
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx", "corpus.token_counts.npy"]


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
    skipping = ds.SampleStream(restarted, micro_batch_size=3)  # a middle pipeline stage: advances, reads nothing
    for _ in range(7):
        skipping.skip_batch()
    assert skipping.state_dict() == state and torch.equal(skipping.next_batch()["tokens"], expected[0]["tokens"])


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
    with pytest.raises(ds.DatasetExhaustedError, match="more train_samples"):
        stream.skip_batch()
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
        ds.build_pretraining_datasets(bpe, SEQ, str(tmp_path / "nope"), train_samples=10, path_to_cache=str(tmp_path))
    with pytest.raises(ValueError, match="seq_length"):
        ds.build_pretraining_datasets(bpe, 0, prefixes[0], train_samples=10, path_to_cache=str(tmp_path))
    with pytest.raises(ValueError, match="train_samples"):
        ds.build_pretraining_datasets(bpe, SEQ, prefixes[0], train_samples=0, path_to_cache=str(tmp_path))
    with pytest.raises(ValueError, match="train_weights"):
        ds.build_pretraining_datasets(bpe, SEQ, prefixes[0], train_samples=10, train_weights=[0.5, 0.5],
                                      path_to_cache=str(tmp_path))


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


# ----- megatron-core's limits (int32 document ids, int16 blend index) -----

def _fabricate_index(prefix, sequences, *, tokens_per_sequence=1, dtype=np.uint16):
    """A megatron indexed dataset of ``sequences`` documents as sparse files (no disk used, nothing written but
    the header and the last entries): the .idx megatron reads, and a .bin of the right size."""
    itemsize = np.dtype(dtype).itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, {2: 8, 4: 4}[itemsize], sequences, sequences + 1))
        header = f.tell()
        f.truncate(header + sequences * 12 + (sequences + 1) * 8)  # lengths, offsets, document boundaries
        f.seek(header)
        f.write(struct.pack("<i", tokens_per_sequence))  # only the first sequence's length is non-zero
        f.seek(header + sequences * 12 + sequences * 8)
        f.write(struct.pack("<q", sequences))  # the last document boundary
    with open(prefix + ".bin", "wb") as f:
        f.truncate(tokens_per_sequence * itemsize)


def test_files_past_megatrons_int32_document_ids_are_refused(tmp_path, bpe):
    big = str(tmp_path / "big")
    _fabricate_index(big, 2**31)  # one more document than int32 ids address
    with pytest.raises(ix.DatasetLimitError, match=r"2147483648 documents in one indexed file.*at most 2147483647"):
        ix.check_indexed_dataset(big)
    # what the training startup calls: refused from the 34-byte header, before megatron builds (and wraps) its
    # int32 document index
    with pytest.raises(ix.DatasetLimitError, match="--workers N"):
        ds.build_pretraining_datasets(bpe, SEQ, big, train_samples=10, path_to_cache=str(tmp_path / "c"))
    with pytest.raises(ix.DatasetLimitError, match="2147483648 documents"):
        ds.unigram_baseline(big, big, bpe.vocab_size)
    assert not (tmp_path / "c").exists()
    ok = str(tmp_path / "ok")
    _fabricate_index(ok, 2**31 - 1)  # the largest count megatron indexes
    assert ix.check_indexed_dataset(ok).sequences == 2**31 - 1
    ix.check_document_count("x", 2**31 - 1)
    with pytest.raises(ix.DatasetLimitError, match="int32"):
        ix.check_document_count("x", 2**40)
    ix.check_blend_size("x", 32766)
    with pytest.raises(ix.DatasetLimitError, match="a blend of 32767 indexed files.*int16"):
        ix.check_blend_size("train_prefixes", 32767)


def test_writer_stops_at_the_document_limit(tmp_path):
    tok = CharTokenizer(300)
    with pytest.raises(ix.DatasetLimitError, match="max_documents=2"):
        pp.write_indexed_dataset(["a", "b", "c"], tok, str(tmp_path / "x"), max_documents=2)
    assert os.listdir(tmp_path) == []  # nothing half-written
    with pytest.raises(ValueError, match="max_documents"):
        ix.IndexedDatasetWriter(str(tmp_path / "y"), np.uint16, max_documents=2**31)
    with pytest.raises(ix.DatasetLimitError, match="max_documents=1"):
        pp.preprocess_files(_jsonl(tmp_path, "in.jsonl", ["a", "b"]), tok, str(tmp_path / "z"), max_documents=1)


def test_writer_is_byte_identical_to_megatrons_builder(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70_000, rng.integers(0, 40)).astype(np.int32) for _ in range(500)]
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.int32)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(tmp_path / "m.idx"))
    # tiny buffers: every flush path runs (documents larger than the token buffer, several length chunks)
    with ix.IndexedDatasetWriter(str(tmp_path / "k"), np.int32, vocab_size=70_000, buffer_tokens=16,
                                 buffer_documents=7) as writer:
        for d in docs:
            writer.add(d)
        writer.commit()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"m{suffix}").read_bytes() == (tmp_path / f"k{suffix}").read_bytes(), suffix
    counts = np.load(tmp_path / "k.token_counts.npy")
    assert np.array_equal(counts, np.bincount(np.concatenate(docs), minlength=70_000))
    with pytest.raises(ValueError, match="token id 70000 outside"):
        with ix.IndexedDatasetWriter(str(tmp_path / "v"), np.int32, vocab_size=70_000) as writer:
            writer.add([70_000])  # an error inside the with block removes the temporary files
    assert sorted(os.listdir(tmp_path)) == ["k.bin", "k.idx", "k.token_counts.npy", "m.bin", "m.idx"]


def _peak_traced_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_writing_holds_no_memory_per_document(tmp_path):
    # megatron's IndexedDatasetBuilder keeps Python lists of every length and offset (~70 bytes a document);
    # our writer's memory is its buffers (small ones here, so that both runs fill them many times)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    doc = np.array([5, 7], dtype=np.uint16)

    def ours(n):
        def run():
            with ix.IndexedDatasetWriter(str(tmp_path / f"k{n}"), np.uint16, vocab_size=300, buffer_tokens=512,
                                         buffer_documents=256) as writer:
                for _ in range(n):
                    writer.add(doc)
                writer.commit()
        return run

    def megatrons(n):
        def run():
            builder = IndexedDatasetBuilder(str(tmp_path / f"m{n}.bin"), dtype=np.uint16)
            for _ in range(n):
                builder.add_document(doc, [2])
            builder.finalize(str(tmp_path / f"m{n}.idx"))
        return run

    growth = _peak_traced_bytes(ours(10_000)) - _peak_traced_bytes(ours(1_000))
    assert growth < 50_000, growth
    reference = _peak_traced_bytes(megatrons(10_000)) - _peak_traced_bytes(megatrons(1_000))
    assert reference > 400_000, reference  # the bound above does tell a per-document list apart


# ----- sharded preprocessing (one indexed file per input, worker processes) -----

def _jsonl(tmp_path, name, docs):
    return write_jsonl(tmp_path / name, docs)


def _documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    return [data[i].tolist() for i in range(len(data))]


@pytest.mark.parametrize("workers", [1, 2])
def test_sharded_preprocessing_equals_one_file(tmp_path, bpe, workers):
    plays = corpus_texts("train")[:3]
    inputs = [_jsonl(tmp_path, f"in{k}.jsonl", play.split("\n\n")[:40 + 7 * k]) for k, play in enumerate(plays)]
    single = pp.preprocess_files(inputs, bpe, str(tmp_path / "one"))
    seen = []
    stats = pp.preprocess_sharded(inputs, bpe, str(tmp_path / "out" / "train"), workers=workers, max_documents=16,
                                  progress=lambda result, done, total: seen.append((result["input"], done, total)))
    manifest = ix.read_manifest(str(tmp_path / "out" / "train"))
    names = [s["name"] for s in manifest["shards"]]
    # each input split into parts of <= 16 documents, in input order
    per_input = [sum(1 for line in open(path) if json.loads(line)["text"]) for path in inputs]
    parts = [[min(16, n - p) for p in range(0, n, 16)] for n in per_input]
    assert names == [f"{k:05d}-{p:03d}" for k, sizes in enumerate(parts) for p in range(len(sizes))]
    assert [s["documents"] for s in manifest["shards"]] == [n for sizes in parts for n in sizes]
    assert len(names) >= 8 and single.documents == sum(per_input)
    shards = ix.dataset_shards(str(tmp_path / "out" / "train"))
    assert [sum(len(d) for d in _documents(s.prefix)) for s in shards] == [s["tokens"] for s in manifest["shards"]]
    assert [d for s in shards for d in _documents(s.prefix)] == _documents(single.path_prefix)
    assert (stats.documents, stats.tokens, stats.shards, stats.workers) == (single.documents, single.tokens,
                                                                            len(names), workers)
    assert stats.tokens_per_second > 0 and stats.tokens_per_cpu_second > 0
    assert sorted(done for _, done, _ in seen) == [1, 2, 3]
    assert np.array_equal(np.load(tmp_path / "out" / "train.shards" / "token_counts.npy"),
                          np.load(tmp_path / "one.token_counts.npy"))
    assert os.listdir(tmp_path / "out") == ["train.shards"]  # no temporaries
    assert sorted(os.listdir(tmp_path / "out" / "train.shards")) == sorted(
        ["manifest.json", "token_counts.npy"] + [f"{n}.{e}" for n in names for e in ("bin", "idx")])


def test_a_blend_of_shards_trains(tmp_path, bpe, prefixes):
    plays = corpus_texts("train")[:4]
    inputs = [_jsonl(tmp_path, f"in{k}.jsonl", play.split("\n\n")) for k, play in enumerate(plays)]
    prefix = str(tmp_path / "train")
    pp.preprocess_sharded(inputs, bpe, prefix, max_documents=400)
    shards = ix.dataset_shards(prefix)
    files, weights = ds.resolve_blend("train_prefixes", prefix)
    assert files == [s.prefix for s in shards] and len(files) > 4
    assert weights == pytest.approx([s.tokens for s in shards])  # blended by tokens, as one dataset would be
    train, valid = ds.build_pretraining_datasets(bpe, SEQ, prefix, prefixes[1], train_samples=8000,
                                                 path_to_cache=str(tmp_path / "c"))
    one_epoch = sum(s.tokens for s in shards) // SEQ
    assert one_epoch < 8000 <= len(train)  # several epochs of every shard
    per_shard = np.bincount(np.asarray(train.dataset_index), minlength=len(shards))
    expected = 8000 * np.array(weights) / sum(weights)
    assert np.all(np.abs(per_shard - expected) <= 1 + 0.01 * expected), (per_shard, expected)
    batch = ds.SampleStream(train, 4).next_batch()
    assert batch["tokens"].shape == (4, SEQ) and int(batch["tokens"].max()) < bpe.vocab_size
    # valid from a sharded prefix: one pass, no weights
    assert ds.resolve_blend("valid_prefixes", prefix, weighted=False) == (files, None)


def _run_tool(args, capsys):
    code = _load_tool().main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_preprocess_tool_errors_are_one_line(tmp_path, bpe, capsys):
    good = _jsonl(tmp_path, "good.jsonl", ["fine", "also fine"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n')
    text = tmp_path / "bad.txt"
    text.write_bytes(b"line one\nline two\n\xff third\n")
    base = ["--tokenizer", f"bpe:{bpe.path}", "--output-prefix", str(tmp_path / "out" / "x")]
    cases = [([good, str(bad)], [], f"{bad}:3: not valid UTF-8 (byte 0xe9 at column 14)"),
             ([good, str(bad)], ["--workers", "2"], f"{bad}:3: not valid UTF-8 (byte 0xe9 at column 14)"),
             ([good, str(text)], [], f"{text}:3: not valid UTF-8 (byte 0xff at column 1)"),
             ([good, str(tmp_path / "missing.jsonl")], ["--workers", "2"],
              f"{tmp_path / 'missing.jsonl'}: no such input file"),
             ([good], ["--tokenizer", "bpe:/nonexistent/tokenizer.json"], "--tokenizer bpe:/nonexistent/"
              "tokenizer.json: path: no tokenizer.json at '/nonexistent/tokenizer.json'"),
             ([good], ["--tokenizer", "default:abc"],
              "--tokenizer default:abc: spec: 'default:<vocab_size>' needs an integer, got 'default:abc'")]
    for inputs, extra, message in cases:
        code, out, err = _run_tool(["--input", *inputs, *base, *extra], capsys)
        assert (code, out) == (2, "") and "Traceback" not in err
        # one line (after the progress lines of the inputs that were done, with --workers)
        assert err.splitlines()[-1] == f"preprocess_data.py: error: {message}", err
        assert sum(line.startswith("preprocess_data.py") for line in err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # nothing half-written
    code, out, _ = _run_tool(["--input", good, good, *base], capsys)
    report = json.loads(out)
    assert code == 0 and report["documents"] == 4 and report["tokens_per_second"] > 0 and report["workers"] == 1
    # a sharded dataset is not written over a single-file one at the same prefix (nor the other way round)
    code, _, err = _run_tool(["--input", good, *base, "--workers", "1"], capsys)
    assert code == 2 and err.endswith("an indexed dataset is at this prefix; remove it (or choose another "
                                      "--output-prefix) before writing a sharded one there\n"), err


def test_a_killed_worker_is_an_error_not_a_hang(tmp_path):
    from tests.helpers.data import DyingTokenizer

    inputs = [_jsonl(tmp_path, "a.jsonl", ["fine"] * 3), _jsonl(tmp_path, "b.jsonl", ["fine", "die"])]
    with pytest.raises(RuntimeError, match="a worker process exited abruptly .* unfinished inputs"):
        pp.preprocess_sharded(inputs, DyingTokenizer(), str(tmp_path / "out" / "x"), workers=2)
    assert os.listdir(tmp_path / "out") == []  # the staging directory is gone


def test_corrupt_compressed_input_names_the_file(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(2000)))
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    with pytest.raises(ValueError, match=rf"{path}: cannot read after line \d+: "):
        list(pp.iter_documents(str(path)))


# ----- the unigram baseline reads a bounded amount -----

@needs_proc_accounting
def test_unigram_baseline_reads_a_bounded_amount(tmp_path):
    tok = CharTokenizer(101)
    big = str(tmp_path / "big")
    _fabricate_index(big, 1, tokens_per_sequence=2**31 - 1)  # 4 GiB of token id 0, no counts stored beside
    valid = pp.write_indexed_dataset(["abd"], tok, str(tmp_path / "valid")).path_prefix
    baseline, touched = bytes_touched(lambda: ds.unigram_baseline(big, valid, 101))
    assert touched < 128 * 2**20, touched
    # counted on 2^24 sampled tokens, all id 0: each of a, b, d, eod has probability 1 / (2^24 + 101)
    assert ds.UNIGRAM_SAMPLE_TOKENS == 2**24 and baseline == pytest.approx(math.log(2**24 + 101), rel=1e-12)


def test_unigram_baseline_from_stored_or_sampled_counts(tmp_path, bpe, prefixes):
    exact = ds.unigram_baseline(*prefixes, bpe.vocab_size)
    counts, is_exact = ds.token_counts(prefixes[0], bpe.vocab_size, max_sample_tokens=1)  # stored: no sampling
    assert is_exact and counts.sum() == os.path.getsize(prefixes[0] + ".bin") // 2
    # without the stored counts: the whole dataset read when it fits the budget (exact), else a sample
    for prefix in prefixes:
        os.replace(prefix + ".token_counts.npy", str(tmp_path / os.path.basename(prefix)))
    try:
        recounted, is_exact = ds.token_counts(prefixes[0], bpe.vocab_size)
        assert is_exact and np.array_equal(recounted, counts)
        assert ds.unigram_baseline(*prefixes, bpe.vocab_size) == pytest.approx(exact, rel=1e-12)
        sampled, is_exact = ds.token_counts(prefixes[0], bpe.vocab_size, max_sample_tokens=counts.sum() // 8)
        assert not is_exact and sampled.sum() == counts.sum() // 8 // 256 * 256
        estimate = ds.unigram_baseline(*prefixes, bpe.vocab_size, max_sample_tokens=int(counts.sum() // 8))
        assert abs(estimate - exact) < 0.1, (estimate, exact)
    finally:
        for prefix in prefixes:
            os.replace(str(tmp_path / os.path.basename(prefix)), prefix + ".token_counts.npy")
