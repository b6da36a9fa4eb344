"""GPT dataset indices built offline (tools/preprocess_data.py build-index) and loaded at startup without
building anything: keyed so that fewer samples reuse an index, the same samples as megatron builds at startup,
startup reads independent of the data's size, clear errors naming the directory and the command when an index
is missing, too small or damaged."""

import contextlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT
from tests.helpers.data import bpe, bytes_touched, needs_proc_accounting, write_jsonl  # noqa: F401 (bpe: a fixture)
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


@contextlib.contextmanager
def _building_forbidden():
    """megatron's index builders raise inside: what runs there builds nothing."""
    from megatron.core.datasets import gpt_dataset, helpers

    def refuse(*args, **kwargs):
        raise AssertionError("an index was built")

    with pytest.MonkeyPatch.context() as m:
        for module, name in ((gpt_dataset, "_build_document_index"), (gpt_dataset, "_build_shuffle_index"),
                             (helpers, "build_sample_idx"), (helpers, "build_blending_indices"),
                             (helpers, "build_exhaustive_blending_indices")):
            m.setattr(module, name, refuse)
        yield


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
    with _building_forbidden():
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
    with _building_forbidden():
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
    with _building_forbidden():
        _load(bpe, data, index_dir, 3000)
        with pytest.raises(di.DatasetIndexError, match=r"at least 3001 training samples; found: samples-3000\)"):
            _load(bpe, data, index_dir, 3001)
        with pytest.raises(di.DatasetIndexError, match=r"the index built for 5000 samples; found: samples-3000"):
            _load(bpe, data, index_dir, 3000, built_samples=5000)
        with pytest.raises(di.DatasetIndexError):  # other data (another seed): another key, nothing built
            _load(bpe, data, index_dir, 3000, seed=7)
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
