"""GPT dataset indices built offline (tools/preprocess_data.py build-index) and loaded at startup without
building anything: keyed so that fewer samples reuse an index, the same samples as megatron builds at startup,
startup reads independent of the data's size, clear errors naming the directory and the command when an index
is missing, too small or damaged."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.data import bpe  # noqa: F401 (a fixture)
from tests.helpers.data import bytes_touched, index_building_forbidden, needs_proc_accounting, write_jsonl
from k2_megatron.data import corpus_texts
from k2_megatron.data import dataset as ds
from k2_megatron.data import dataset_index as di
from k2_megatron.data import preprocess as pp

ROOT = str(REPO_ROOT)
SEQ = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory, bpe):
    """A sharded training dataset (4 inputs, parts of <= 300 paragraphs) and a held-out one."""
    out = tmp_path_factory.mktemp("data")
    inputs = [write_jsonl(out / f"in{k}.jsonl", play.split("\n\n")) for k, play in enumerate(corpus_texts("train")[:4])]
    pp.preprocess_sharded(inputs, bpe, str(out / "train"), max_documents=300)
    valid = pp.write_indexed_dataset(corpus_texts("valid")[:1], bpe, str(out / "valid")).path_prefix
    return str(out / "train"), valid


def _tool(args, capsys):
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(args)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def _build_args(bpe, data, samples, index_dir):
    return ["build-index", "--tokenizer", f"bpe:{bpe.path}", "--seq-length", str(SEQ), "--train-prefix", data[0],
            "--valid-prefix", data[1], "--train-samples", str(samples), "--index-dir", index_dir]


def _same_samples(a, b, indices):
    for i in indices:
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x), i


def _load(bpe, data, index_dir, train_samples, **kwargs):
    return di.load_dataset_index(bpe, SEQ, data[0], data[1], train_samples=train_samples, index_dir=index_dir,
                                 **kwargs)


def test_prebuilt_index_loads_without_building(tmp_path, bpe, data, capsys):
    index_dir = str(tmp_path / "indices")
    code, built = _tool(_build_args(bpe, data, 6000, index_dir), capsys)
    assert code == 0 and built["built"] and built["train_samples"] == 6000 and built["train_length"] >= 6000
    assert os.path.basename(built["path"]) == "samples-6000"
    # what megatron builds at startup today, for the same 6000 samples
    ref_train, ref_valid = ds.build_pretraining_datasets(bpe, SEQ, data[0], data[1], train_samples=6000,
                                                         path_to_cache=str(tmp_path / "startup"))
    with index_building_forbidden():
        for needed in (6000, 4000):  # fewer samples than built: the same index, as it is
            train, valid = _load(bpe, data, index_dir, needed)
            assert len(train) == len(ref_train) and len(valid) == len(ref_valid)
            _same_samples(train, ref_train, [0, 1, 2999, len(ref_train) - 1])
            _same_samples(valid, ref_valid, [0, len(ref_valid) - 1])
            assert train.unique_description_hash == ref_train.unique_description_hash  # resumes check this
        code, again = _tool(_build_args(bpe, data, 5000, index_dir), capsys)  # covered: nothing built
        assert code == 0 and not again["built"] and again["path"] == built["path"]
    code, more = _tool(_build_args(bpe, data, 9000, index_dir), capsys)
    assert code == 0 and more["built"] and os.path.basename(more["path"]) == "samples-9000"
    with index_building_forbidden():
        assert len(_load(bpe, data, index_dir, 7000)[0]) == more["train_length"]  # the smallest that covers
        assert _load(bpe, data, index_dir, 4000)[0].unique_description_hash == ref_train.unique_description_hash
        pinned, _ = _load(bpe, data, index_dir, 4000, built_samples=6000)  # a checkpoint's own index
        assert pinned.unique_description_hash == ref_train.unique_description_hash
    assert sorted(os.listdir(os.path.dirname(built["path"]))) == ["definition.json", "samples-6000",
                                                                  "samples-9000"]  # no temporaries


def test_missing_small_or_damaged_index_is_a_clear_error(tmp_path, bpe, data, capsys):
    index_dir = str(tmp_path / "indices")
    command = (f"python tools/preprocess_data.py build-index --tokenizer bpe:{bpe.path} --seq-length {SEQ} "
               f"--train-prefix {data[0]} --valid-prefix {data[1]} --train-samples 3000 --seed 1234 "
               f"--index-dir {index_dir}")
    with pytest.raises(di.DatasetIndexError) as err:
        _load(bpe, data, index_dir, 3000)
    assert str(err.value).startswith(os.path.join(index_dir, "")) and "found: none" in str(err.value)
    assert str(err.value).endswith(f"Build it offline with: {command}")
    assert _tool(command.split()[2:], capsys)[0] == 0  # the command in the message builds what was missing
    with index_building_forbidden():
        _load(bpe, data, index_dir, 3000)
        with pytest.raises(di.DatasetIndexError, match=r"at least 3001 training samples; found: samples-3000\)"):
            _load(bpe, data, index_dir, 3001)
        with pytest.raises(di.DatasetIndexError, match=r"the index built for 5000 samples; found: samples-3000"):
            _load(bpe, data, index_dir, 3000, built_samples=5000)
        with pytest.raises(di.DatasetIndexError) as err:  # other data (another seed): another key, nothing built
            _load(bpe, data, index_dir, 3000, seed=7)
        assert re.search(rf"found: none; {index_dir} holds indices of other data: [0-9a-f]{{24}} differs in seed\)",
                         str(err.value)), str(err.value)
        (path,) = [os.path.join(r, d) for r, ds_, _ in os.walk(index_dir) for d in ds_ if d == "samples-3000"]
        victim = sorted(f for f in os.listdir(path) if f.endswith("shuffle_index.npy"))[0]
        os.unlink(os.path.join(path, victim))
        with pytest.raises(di.DatasetIndexError, match=rf"{path}: the prebuilt dataset index is damaged: "
                                                       rf"{victim} \(missing\); remove the directory"):
            _load(bpe, data, index_dir, 3000)


def _many_documents(prefix, n):
    """An indexed dataset of n two-token documents (1, 2), written with numpy: a large .idx quickly."""
    np.tile(np.array([1, 2], np.uint16), n).tofile(prefix + ".bin")
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + np.array([1], "<u8").tobytes() + bytes([8])
                + np.array([n, n + 1], "<u8").tobytes())
        np.full(n, 2, np.int32).tofile(f)
        (np.arange(n, dtype=np.int64) * 4).tofile(f)
        np.arange(n + 1, dtype=np.int64).tofile(f)


@needs_proc_accounting
def test_startup_reads_do_not_grow_with_the_data(tmp_path, bpe, data):
    big = str(tmp_path / "big")
    _many_documents(big, 4_000_000)  # an 80 MB .idx
    index = di.build_dataset_index(bpe, SEQ, big, data[1], train_samples=2000, index_dir=str(tmp_path / "i"))

    def load():
        return di.load_dataset_index(bpe, SEQ, big, data[1], train_samples=2000, index_dir=str(tmp_path / "i"))

    bytes_touched(load)  # first call: imports and lazy initialisation
    (train, _), touched = bytes_touched(load)
    assert touched < 4_000_000, touched
    assert train[0]["tokens"][:4].tolist() in ([1, 2, 1, 2], [2, 1, 2, 1])  # (reading samples pages in their data)
    # megatron's own startup on the very same cached index still walks every document (an int32 arange of 16 MB)
    _, reference = bytes_touched(lambda: ds.build_pretraining_datasets(
        bpe, SEQ, big, data[1], train_samples=2000, path_to_cache=index.path))
    assert reference > 16_000_000, reference


def test_a_runs_datasets_come_from_its_index_dir_or_its_cache_dir(tmp_path, bpe, data, monkeypatch):
    """pretraining_datasets (k2-pretrain's data.index_dir / data.cache_dir / data.train_samples): with an index
    directory the prebuilt index is loaded, whatever the run's sample count within it (a changed train.iters), and
    nothing is built; without one the indices are built into the cache directory given, never a home directory."""
    index_dir, cache_dir = str(tmp_path / "indices"), str(tmp_path / "cache")

    def run(train_samples, **kwargs):
        return di.pretraining_datasets(bpe, SEQ, data[0], data[1], train_samples=train_samples, seed=1234,
                                       cache_dir=cache_dir, **kwargs)

    with index_building_forbidden(), pytest.raises(di.DatasetIndexError) as err:
        run(3000, index_dir=index_dir)
    assert str(err.value).startswith(f"data.index_dir={index_dir}: {index_dir}{os.sep}")
    assert "no prebuilt dataset index" in str(err.value) and "--train-samples 3000 " in str(err.value)
    di.build_dataset_index(bpe, SEQ, data[0], data[1], train_samples=3000, index_dir=index_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("K2_MEGATRON_CACHE", str(tmp_path / "home" / ".cache"))
    reference, _ = ds.build_pretraining_datasets(bpe, SEQ, data[0], data[1], train_samples=3000,
                                                 path_to_cache=str(tmp_path / "reference"))
    with index_building_forbidden():
        for needed in (3000, 1000):  # e.g. train.iters lowered: the same index, the same samples
            train, valid, built_for = run(needed, index_dir=index_dir)
            assert built_for == 3000 and train.unique_description_hash == reference.unique_description_hash
            _same_samples(train, reference, [0, 1, len(reference) - 1])
        run(1000, index_dir=index_dir, built_samples=3000)  # data.train_samples: exactly that index
        with pytest.raises(di.DatasetIndexError, match="the index built for 2000 samples; found: samples-3000"):
            run(2000, index_dir=index_dir, built_samples=2000)
    assert not os.path.exists(cache_dir)
    train, valid, built_for = run(2000, index_dir=None)  # built at startup, for exactly the samples asked
    assert built_for == 2000 and len(train) >= 2000 and valid is not None
    assert any(f.endswith("GPTDataset-train-shuffle_index.npy") for f in os.listdir(cache_dir))
    assert not os.path.exists(tmp_path / "home")
