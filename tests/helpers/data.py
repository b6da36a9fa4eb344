"""Shared helpers of the data tests (not collected)."""

import os
import tracemalloc

import pytest

needs_proc_accounting = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                           reason="needs Linux /proc read and peak-memory accounting")


def bytes_touched(fn):
    """(fn(), an upper bound of the bytes fn touched): bytes passed by read() calls (/proc/self/io rchar) + the
    growth of the peak resident set (memory-mapped reads) + the peak of traced allocations (numpy's included:
    the resident set does not grow where freed memory is reused). Independent of how fn reads."""
    def proc(path, field):
        with open(path) as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    rss, rchar = proc("/proc/self/status", "VmRSS:"), proc("/proc/self/io", "rchar:")
    tracemalloc.start()
    try:
        result = fn()
        allocated = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    mapped = (proc("/proc/self/status", "VmHWM:") - rss) * 1024
    return result, proc("/proc/self/io", "rchar:") - rchar + mapped + allocated


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 512-id byte-level BPE trained on three plays of the bundled corpus (a second or two); a test module
    uses it by importing it."""
    from k2_megatron.data import corpus_texts
    from k2_megatron.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(corpus_texts("train")[:3], 512, str(tmp_path_factory.mktemp("tok") / "tok.json"))


def write_jsonl(path, docs) -> str:
    """JSON lines, one {"text": doc} per document; returns the path as a string."""
    import json

    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


class DyingTokenizer:
    """Tokenizes like CharTokenizer but kills its own process on the document "die" (a worker killed, as by the
    out-of-memory killer); importable by spawned worker processes."""

    name = "dying"
    vocab_size = 300
    eod = 299
    unique_identifiers = {"class": "DyingTokenizer"}

    def encode(self, text):
        import signal

        if text == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        return [ord(ch) % 299 for ch in text]
