"""Tokenizers: the byte-level BPE trained offline, K2's tiktoken rank-file format, one interface for both."""

import base64
import json
import random
import time

import pytest

from k2_megatron.data import corpus_texts
from k2_megatron.data import tokenizer as tk

UNICODE_SAMPLES = [
    "",
    "a",
    "中文English混合 naïve café — 🚀 emoji, Ωmega!",
    "He's   here.\tTabs\r\nCRLF\n\n\nand 1234567 digits; \x00\x7f control",
    "   leading and trailing spaces   ",
    "<|endoftext|> inside text",
]


@pytest.fixture(scope="module")
def texts():
    train = corpus_texts("train")
    return {"train": train[:8], "valid": corpus_texts("valid")}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    return tk.train_bpe_tokenizer(texts["train"], 1024, str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("tiktoken") / "tiktoken.model"
    specials = tk.export_tiktoken_ranks(bpe, str(path))
    return str(path), specials


def test_bpe_vocab_layout(bpe):
    assert bpe.vocab_size == 1024
    assert bpe.eod == 1023  # the end-of-document token is the last id
    assert bpe.decode([bpe.eod]) == tk.BPE_EOD_TOKEN
    assert bpe.unique_identifiers["vocab_size"] == 1024 and len(bpe.unique_identifiers["sha256"]) == 64


def test_bpe_round_trip(bpe, texts):
    for text in texts["valid"][:2] + UNICODE_SAMPLES:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    # the held-out play compresses: a trained BPE, not bytes (~2.4 characters per token at 1k, ~3.3 at 4k)
    play = texts["valid"][0]
    assert len(play) / len(bpe.encode(play)) > 2.0
    assert bpe.encode("<|endoftext|>") == [bpe.eod]
    assert bpe.encode_batch(["ab", "cd"]) == [bpe.encode("ab"), bpe.encode("cd")]


def test_bpe_uses_k2_pretokenisation(bpe):
    # K2's regex: Han runs split from Latin words, contractions stay on the word, digits in groups of <= 3,
    # a run of spaces keeps its last space for the next word.
    def offsets(s):
        return [o for _, o in bpe._tok.pre_tokenizer.pre_tokenize_str(s)]

    assert offsets("中文English混合") == [(0, 2), (2, 9), (9, 11)]
    assert offsets("He's   here") == [(0, 4), (4, 6), (6, 11)]
    assert offsets("12345") == [(0, 3), (3, 5)]
    assert offsets("CamelCase") == [(0, 5), (5, 9)]


def test_bpe_training_is_deterministic_and_validated(tmp_path, texts, bpe):
    again = tk.train_bpe_tokenizer(texts["train"], 1024, str(tmp_path / "again.json"))
    assert again.unique_identifiers["sha256"] == bpe.unique_identifiers["sha256"]
    with pytest.raises(ValueError, match="vocab_size"):
        tk.train_bpe_tokenizer(texts["train"], 100, str(tmp_path / "x.json"))
    with pytest.raises(FileNotFoundError, match="path"):
        tk.BPETokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="eod_token"):
        tk.BPETokenizer(str(tmp_path / "again.json"), eod_token="<|nope|>")
    with pytest.raises(ValueError, match="ids"):
        bpe.decode([0, bpe.vocab_size])
    with pytest.raises(TypeError, match="text"):
        bpe.encode(b"bytes")


def test_tiktoken_export_gives_identical_ids(bpe, exported, texts):
    path, specials = exported
    assert specials == {tk.BPE_EOD_TOKEN: bpe.eod}
    tik = tk.TiktokenTokenizer(path, special_tokens=specials, eod_token=tk.BPE_EOD_TOKEN)
    assert (tik.vocab_size, tik.eod) == (bpe.vocab_size, bpe.eod)
    n_tokens = 0
    for text in texts["valid"] + UNICODE_SAMPLES:
        ids = bpe.encode(text)
        assert tik.encode(text) == ids
        assert tik.decode(ids) == text
        n_tokens += len(ids)
    assert n_tokens > 100_000  # the whole held-out split was compared


def test_tiktoken_k2_default_layout(exported, tmp_path):
    path, _ = exported
    n = 1023  # ranks in the file: the BPE without its eod token
    tik = tk.TiktokenTokenizer(path)
    assert tik.vocab_size == n + tk.K2_NUM_RESERVED_SPECIAL_TOKENS  # K2: 163,584 ranks + 256 = 163,840
    assert tik.special_tokens["[BOS]"] == n and tik.eod == tik.special_tokens["[EOS]"] == n + 1
    assert tik.special_tokens[f"<|reserved_token_{n + 255}|>"] == n + 255
    assert tik.decode([n + 1]) == "[EOS]"
    ids = tik.encode("to be[EOS]or not")
    assert n + 1 in ids and tik.decode(ids) == "to be[EOS]or not"
    # names from a tokenizer_config.json next to the rank file, as in the K2 release
    folder = tmp_path / "k2like"
    folder.mkdir()
    (folder / "tiktoken.model").write_bytes(open(path, "rb").read())
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(n): {"content": "[BOS]"}, str(n + 1): {"content": "[EOS]"}, str(n + 2): {"content": "<|im_end|>"}}}))
    tik2 = tk.load_tokenizer(f"tiktoken:{folder}")
    assert isinstance(tik2, tk.TiktokenTokenizer)
    assert tik2.special_tokens["<|im_end|>"] == n + 2 and tik2.eod == n + 1
    assert tik2.unique_identifiers != tik.unique_identifiers  # different special tokens, different identity


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_tiktoken_rank_file_errors(tmp_path):
    byte_lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    ok = _write(tmp_path / "ok.model", byte_lines + [f"{base64.b64encode(b'ab').decode()} 256"])
    assert len(tk.load_tiktoken_ranks(ok)) == 257
    cases = {
        "gap": (byte_lines + [f"{base64.b64encode(b'ab').decode()} 300"], "dense rank space"),
        "b64": (byte_lines + ["!!notbase64!! 256"], r"bad\.model:257: not a 'base64-token rank' line"),
        "dup": (byte_lines + [f"{base64.b64encode(b'a').decode()} 256"], "appears twice"),
        "fields": (byte_lines + ["YWI= 256 extra"], "expected 2 fields"),
        "bytes": (byte_lines[:200], "all 256 single bytes"),
    }
    for name, (lines, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            tk.load_tiktoken_ranks(_write(tmp_path / ("bad.model" if name == "b64" else f"{name}.model"), lines))
    with pytest.raises(FileNotFoundError, match="path"):
        tk.load_tiktoken_ranks(str(tmp_path / "none.model"))
    with pytest.raises(ValueError, match="special_tokens"):
        tk.TiktokenTokenizer(ok, special_tokens={"<s>": 3}, eod_token="<s>")
    with pytest.raises(ValueError, match="eod_token"):
        tk.TiktokenTokenizer(ok, special_tokens={"<s>": 257})
    with pytest.raises(ValueError, match="eod_token"):
        tk.TiktokenTokenizer(ok, eod_token="<|nope|>")


def test_export_rejects_ranks_that_break_merge_order(tmp_path):
    from tokenizers import Tokenizer, models

    alphabet = [tk._bytes_to_unicode()[b] for b in range(256)]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"abc": 256, "ab": 257})  # "abc" (second merge) gets a lower id than "ab" (first merge)
    bad = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    bad.add_special_tokens([tk.BPE_EOD_TOKEN])
    bad.save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="merge order"):
        tk.export_tiktoken_ranks(tk.BPETokenizer(str(tmp_path / "bad.json")), str(tmp_path / "bad.model"))


@pytest.mark.slow
def test_default_tokenizer_is_cached(tmp_path, monkeypatch):
    first = tk.default_tokenizer(512, cache_dir=str(tmp_path))
    assert first.vocab_size == 512 and first.path.startswith(str(tmp_path))

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tk, "train_bpe_tokenizer", no_training)
    second = tk.load_tokenizer("default:512", cache_dir=str(tmp_path))
    assert second.unique_identifiers == first.unique_identifiers
    monkeypatch.setenv("K2_MEGATRON_CACHE", str(tmp_path))
    assert tk.default_cache_dir() == str(tmp_path)
    assert tk.load_tokenizer(first.path).unique_identifiers == first.unique_identifiers
    assert tk.load_tokenizer(f"bpe:{first.path}").unique_identifiers == first.unique_identifiers


@pytest.mark.parametrize("spec,match", [("", "spec"), ("default:abc", "integer"), ("nope", "neither")])
def test_load_tokenizer_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        tk.load_tokenizer(spec)


def test_tiktoken_splits_long_runs_like_k2(exported, monkeypatch):
    # K2's wrapper: <= 400k characters per tiktoken call, runs of > 25k (non-)whitespace cut every 25k characters
    assert tk.split_long_runs("") == [""]
    assert tk.split_long_runs("ordinary text, short runs") == ["ordinary text, short runs"]
    assert tk.split_long_runs("aaaaaaa  bb", max_run=3) == ["aaa", "aaa", "a  bb"]
    assert tk.split_long_runs("a" * 7 + " " * 7, max_run=3) == ["aaa", "aaa", "a   ", "   ", " "]
    assert tk.split_long_runs("x" * 10, max_chars=4) == ["xxxx", "xxxx", "xx"]
    path, specials = exported
    tik = tk.TiktokenTokenizer(path, special_tokens=specials, eod_token=tk.BPE_EOD_TOKEN)
    text = "word " + "z" * 23 + "   tail"
    whole = tik.encode(text)
    monkeypatch.setattr(tk, "TIKTOKEN_MAX_RUN_CHARS", 10)
    pieces = tk.split_long_runs(text)
    assert pieces == ["word " + "z" * 10, "z" * 10, "zzz   tail"]
    cut = tik.encode(text)
    assert cut == [i for p in pieces for i in tik._enc.encode(p)] and tik.decode(cut) == text
    assert len(whole) <= len(cut)


def _reference_split(text, max_chars, max_run):
    """split_long_runs by definition, one character at a time: chunks of max_chars, then every maximal run of
    more than max_run same-class characters (str.isspace) cut after each max_run characters."""
    pieces = []
    for start in range(0, max(len(text), 1), max_chars):
        chunk = text[start:start + max_chars]
        cut, run_start = 0, 0
        for i in range(1, len(chunk) + 1):
            if i == len(chunk) or chunk[i].isspace() != chunk[run_start].isspace():
                for pos in range(run_start + max_run, i, max_run):
                    pieces.append(chunk[cut:pos])
                    cut = pos
                run_start = i
        pieces.append(chunk[cut:])
    return pieces


def test_split_long_runs_matches_its_definition():
    rng = random.Random(0)
    alphabet = ["a", "中", "+", " ", "\n", "\t", "\u3000", "\x1c", "\x85", "\u00a0", "é"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet[:3]) * rng.randint(1, 9) + rng.choice(alphabet[3:]) * rng.randint(0, 9)
                       for _ in range(rng.randint(0, 12)))
        max_chars, max_run = rng.randint(1, 40), rng.randint(1, 6)
        assert tk.split_long_runs(text, max_chars, max_run) == _reference_split(text, max_chars, max_run), text


def _chars_per_second(text):
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        tk.split_long_runs(text)
        best = min(best, time.perf_counter() - t0)
    return len(text) / best


def test_split_long_runs_is_linear_in_the_run_length():
    # runs of 500 and of 5000 non-whitespace characters (below the 25k cut: one piece each way); a search that
    # restarts at every position of a run (quadratic) is ~10x slower per character on the longer runs
    short, long = ("x" * 499 + " ") * 400, ("x" * 4999 + " ") * 40
    assert tk.split_long_runs(short) == [short] and tk.split_long_runs(long) == [long]
    ratios = []
    for _ in range(3):  # interleaved, best of each: load on the machine hits both alike
        ratios.append(_chars_per_second(short) / _chars_per_second(long))
    assert min(ratios) < 3.0, ratios
