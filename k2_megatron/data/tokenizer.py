"""Tokenizers with one interface: a byte-level BPE trained offline with ``tokenizers``, and K2's own format,
a tiktoken BPE rank file (one ``base64(token bytes) rank`` per line) loaded into ``tiktoken.Encoding``.

Both split text with K2's pre-tokenisation regex (``K2_PAT_STR``, from Moonshot's ``tokenization_kimi.py`` of the
K2 release: Han runs, cased words with English contractions, 1-3 digit groups, punctuation runs, whitespace), and
both ignore nothing: every byte string round-trips. A BPE trained here and exported with ``export_tiktoken_ranks``
loads back through ``TiktokenTokenizer``, the same code path as K2's 163,840-token file, and gives the same ids.

Interface (``TextTokenizer``): ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` (every id,
special tokens included), ``eod`` (the end-of-document id appended after each document), ``name``, and
``unique_identifiers`` (a dict; megatron-core's datasets hash it into their cache keys). Special-token strings
that appear in the text are encoded as the special token, in both implementations (K2's wrapper does the same,
``allowed_special="all"``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

# K2's pre-tokenisation regex (tokenization_kimi.py of the Kimi K2 release), one alternation. The character-class
# intersections (&&) keep Han out of the letter branches so that Han runs split on their own.
K2_PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
# K2 reserves 256 ids above its rank space (163,584 ranks + 256 = 163,840); the first two are [BOS] and [EOS].
K2_NUM_RESERVED_SPECIAL_TOKENS = 256
K2_DEFAULT_SPECIAL_NAMES = {0: "[BOS]", 1: "[EOS]"}  # offsets above the rank space
K2_EOD_TOKEN = "[EOS]"
# The end-of-document token of the BPEs trained here (the last id of the vocabulary).
BPE_EOD_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
# K2's wrapper encodes at most 400k characters per tiktoken call and cuts runs of more than 25k consecutive
# whitespace or non-whitespace characters (a single huge pre-token makes BPE merging quadratic).
TIKTOKEN_MAX_CHARS = 400_000
TIKTOKEN_MAX_RUN_CHARS = 25_000


def default_cache_dir() -> str:
    """Where derived data (tokenizers, indexed datasets) is cached: $K2_MEGATRON_CACHE or ~/.cache/k2_megatron."""
    return os.environ.get("K2_MEGATRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "k2_megatron")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Write then rename, so that a reader (another rank, a crashed run) never sees a partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class TextTokenizer(ABC):
    """The tokenizer interface the data pipeline and the training loop use."""

    # Set by every implementation's constructor.
    name: str
    _vocab_size: int
    _eod: int
    _identity: dict

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens decode to their names)."""

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: every id is in [0, vocab_size)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """The end-of-document id, appended after every document by the preprocessing."""
        return self._eod

    @property
    def unique_identifiers(self) -> dict:
        """A JSON-able identity (kind, file hash, vocab size): megatron-core hashes it into dataset cache keys."""
        return dict(self._identity)

    # megatron-core's tokenizer vocabulary uses these names too.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: {len(bad)} ids outside [0, vocab_size={self.vocab_size}), first {bad[:5]}")
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class BPETokenizer(TextTokenizer):
    """A byte-level BPE in Hugging Face ``tokenizers`` format (tokenizer.json), e.g. made by train_bpe_tokenizer.

    The end-of-document token is ``eod_token`` (default ``<|endoftext|>``), which must be an added token.
    """

    def __init__(self, path: str, eod_token: str = BPE_EOD_TOKEN):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no tokenizer.json at {path!r}")
        self.path = os.path.abspath(path)
        self._tok = Tokenizer.from_file(self.path)
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"eod_token: {eod_token!r} is not a token of {path!r}")
        self._eod = eod
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._sha = _sha256_file(self.path)
        self._identity = {"class": type(self).__name__, "sha256": self._sha, "vocab_size": self._vocab_size,
                          "eod": self._eod}
        self.name = f"bpe-{self._vocab_size}-{self._sha[:12]}"

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts at once (``tokenizers`` runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=False)



def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parses a tiktoken BPE rank file: one ``base64(token bytes) rank`` per line (K2's ``tiktoken.model``).

    Checks that tokens and ranks are unique and that the ranks are exactly 0..n-1 (tiktoken needs a dense rank
    space; the special tokens go above it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no tiktoken rank file at {path!r}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected 2 fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not a 'base64-token rank' line ({exc}): {line[:80]!r}") from None
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice (ranks {ranks[token]} and {rank})")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: no ranks in the file")
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        first_gap = next(i for i, v in enumerate(values) if v != i)
        raise ValueError(f"{path}: ranks must be exactly 0..{len(values) - 1} (a dense rank space); "
                         f"first unexpected rank at sorted position {first_gap}: {values[first_gap]}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ValueError(f"{path}: a byte-level BPE needs all 256 single bytes as tokens; missing {missing_bytes[:8]}")
    return ranks


class TiktokenTokenizer(TextTokenizer):
    """A tiktoken BPE rank file with K2's pre-tokenisation regex (K2's own tokenizer format).

    Special tokens sit above the ``n`` ranks. By default K2's layout: ``num_reserved_special_tokens`` (256) ids
    [n, n+256), named from a ``tokenizer_config.json`` next to the file when it has ``added_tokens_decoder``
    (as the K2 release does), else ``[BOS]`` = n, ``[EOS]`` = n+1 and ``<|reserved_token_{id}|>`` for the rest;
    ``eod_token`` defaults to ``[EOS]``. ``special_tokens`` (name -> id) replaces that layout entirely.
    """

    def __init__(self, path: str, *, special_tokens: dict[str, int] | None = None, eod_token: str | None = None,
                 num_reserved_special_tokens: int = K2_NUM_RESERVED_SPECIAL_TOKENS, pat_str: str = K2_PAT_STR):
        import tiktoken

        self.path = os.path.abspath(path)
        ranks = load_tiktoken_ranks(self.path)
        n = len(ranks)
        if special_tokens is None:
            if num_reserved_special_tokens < 2:
                raise ValueError("num_reserved_special_tokens: K2's layout needs at least 2 ([BOS], [EOS]), "
                                 f"got {num_reserved_special_tokens}")
            names = {n + off: name for off, name in K2_DEFAULT_SPECIAL_NAMES.items()}
            names.update(self._names_from_config(os.path.join(os.path.dirname(self.path), "tokenizer_config.json")))
            special_tokens = {names.get(i, f"<|reserved_token_{i}|>"): i
                              for i in range(n, n + num_reserved_special_tokens)}
            eod_token = K2_EOD_TOKEN if eod_token is None else eod_token
        else:
            special_tokens = dict(special_tokens)
            clash = {k: v for k, v in special_tokens.items() if not n <= v}
            if clash:
                raise ValueError(f"special_tokens: ids must be >= the number of ranks ({n}); got {clash}")
            if len(set(special_tokens.values())) != len(special_tokens):
                raise ValueError(f"special_tokens: ids must be unique, got {special_tokens}")
            if eod_token is None:
                raise ValueError("eod_token: required with explicit special_tokens")
        if eod_token not in special_tokens:
            raise ValueError(f"eod_token: {eod_token!r} is not among the special tokens "
                             f"({sorted(special_tokens)[:6]}...)")
        self._enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens=special_tokens)
        self.special_tokens = special_tokens
        self._eod = special_tokens[eod_token]
        self._vocab_size = max(n, max(special_tokens.values(), default=-1) + 1)
        self._sha = _sha256_file(self.path)
        self._identity = {"class": type(self).__name__, "sha256": self._sha, "vocab_size": self._vocab_size,
                          "eod": self._eod, "pat_str": hashlib.sha256(pat_str.encode()).hexdigest()[:16],
                          "special_tokens": hashlib.sha256(json.dumps(special_tokens, sort_keys=True).encode())
                          .hexdigest()[:16]}
        self.name = f"tiktoken-{self._vocab_size}-{self._sha[:12]}"

    @staticmethod
    def _names_from_config(path: str) -> dict[int, str]:
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        decoder = config.get("added_tokens_decoder", {})
        return {int(i): (t["content"] if isinstance(t, dict) else str(t)) for i, t in decoder.items()}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, split into pieces as K2's wrapper does (``split_long_runs``)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids.extend(self._enc.encode(piece, allowed_special="all"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(self._check_ids(ids))



def split_long_runs(text: str, max_chars: int | None = None, max_run: int | None = None) -> list[str]:
    """Cuts ``text`` into chunks of ``max_chars`` (400k) characters, then cuts every run of more than ``max_run``
    (25k) consecutive whitespace or non-whitespace characters (``str.isspace``) after each ``max_run``
    characters of the run, as K2's tokenizer wrapper does before calling tiktoken. Ordinary text is one piece.

    Linear time: a run is only matched from its first character (the look-behinds), so a run shorter than
    ``max_run`` is scanned once, not once per position as a plain ``\\S{n,}`` search would (quadratic in the
    run length: code, base64, unspaced scripts)."""
    max_chars = max_chars or TIKTOKEN_MAX_CHARS
    max_run = max_run or TIKTOKEN_MAX_RUN_CHARS
    pieces = []
    long_run = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (max_run + 1, max_run + 1))
    for start in range(0, max(len(text), 1), max_chars):
        chunk = text[start:start + max_chars]
        cut = 0
        for run in long_run.finditer(chunk):
            for pos in range(run.start() + max_run, run.end(), max_run):
                pieces.append(chunk[cut:pos])
                cut = pos
        pieces.append(chunk[cut:])
    return pieces


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2; what ``tokenizers``' ByteLevel uses):
    printable Latin-1 bytes map to themselves, the other 68 to code points 256.. in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_path: str, *,
                        eod_token: str = BPE_EOD_TOKEN, min_frequency: int = 2) -> BPETokenizer:
    """Trains a byte-level BPE on ``texts`` with K2's pre-tokenisation and writes ``output_path`` (tokenizer.json).

    The vocabulary is the 256 bytes, then the merges in training order, then ``eod_token`` as the last id, so
    ``vocab_size`` counts every id (it may come out smaller if the corpus runs out of pairs). Deterministic for
    the same texts; the file is written atomically.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size: must be an int >= 258 (256 bytes, >= 1 merge, the eod token), "
                         f"got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([eod_token])
    _atomic_write_bytes(output_path, tok.to_str(pretty=False).encode("utf-8"))
    return BPETokenizer(output_path, eod_token=eod_token)


def export_tiktoken_ranks(tokenizer: BPETokenizer, path: str) -> dict[str, int]:
    """Writes the BPE's mergeable ranks as a tiktoken rank file (K2's format); returns its special tokens.

    rank = the BPE id. tiktoken merges the adjacent pair whose concatenation has the lowest rank, which equals
    the BPE's merge order when every merged token's id grows with its merge index; that is checked here, so a
    file written by this function encodes exactly as the BPE does.
    """
    if not isinstance(tokenizer, BPETokenizer):
        raise TypeError(f"tokenizer: expected a BPETokenizer, got {type(tokenizer).__name__}")
    state = json.loads(tokenizer._tok.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer: expected a BPE model, got {model.get('type')!r}")
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    try:
        ranks = {bytes(u2b[ch] for ch in tok_str): i for tok_str, i in model["vocab"].items()}
    except KeyError as exc:
        raise ValueError(f"tokenizer: token with a non byte-level character {exc}: not a byte-level BPE") from None
    prev = -1
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        merged = model["vocab"][left + right]
        if merged <= prev:
            raise ValueError(f"tokenizer: merge {left!r}+{right!r} -> id {merged} is not above the previous merge's "
                             f"id {prev}: its ranks would not reproduce the BPE's merge order")
        prev = merged
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    _atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("ascii"))
    return {t["content"]: t["id"] for t in state.get("added_tokens", [])}


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | None = None) -> BPETokenizer:
    """The byte-level BPE of the bundled corpus's training split, trained once (~1-3 s) and cached under
    ``<cache_dir>/tokenizers/`` keyed on the corpus fingerprint and ``vocab_size``."""
    from k2_megatron.data.corpus import corpus_fingerprint, corpus_texts

    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, "tokenizers", f"shakespeare-{corpus_fingerprint()}-bpe{vocab_size}",
                        "tokenizer.json")
    if os.path.isfile(path):
        return BPETokenizer(path)
    return train_bpe_tokenizer(corpus_texts("train"), vocab_size, path)


def load_tokenizer(spec: str, cache_dir: str | None = None) -> TextTokenizer:
    """A tokenizer from a string, as written in configs and on command lines:

    - ``default`` or ``default:<vocab_size>``: the cached BPE of the bundled corpus (``default_tokenizer``)
    - ``bpe:<path>`` or a path ending in ``.json``: a tokenizer.json (``BPETokenizer``)
    - ``tiktoken:<path>`` or any other existing path: a tiktoken rank file in K2's layout (``TiktokenTokenizer``);
      a directory means its ``tiktoken.model``
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec: expected a tokenizer spec string, got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "default":
        try:
            vocab = int(arg) if arg else DEFAULT_VOCAB_SIZE
        except ValueError:
            raise ValueError(f"spec: 'default:<vocab_size>' needs an integer, got {spec!r}") from None
        return default_tokenizer(vocab, cache_dir)
    if kind == "bpe":
        return BPETokenizer(arg)
    if kind == "tiktoken":
        path = os.path.join(arg, "tiktoken.model") if os.path.isdir(arg) else arg
        return TiktokenTokenizer(path)
    if spec.endswith(".json"):
        return BPETokenizer(spec)
    if os.path.exists(spec):
        return load_tokenizer("tiktoken:" + spec)
    raise ValueError(f"spec: {spec!r} is neither 'default[:N]', 'bpe:<tokenizer.json>', 'tiktoken:<rank file>' "
                     "nor an existing file")
