r"""Turn raw text / JSON lines into megatron-core indexed datasets, and build their GPT dataset indices offline.

Thin command line over ``k2_megatron.data``: one sequence per document, the tokenizer's end-of-document id
appended (unless --no-eod); PREFIX.token_counts.npy beside the data (the unigram baseline reads it).

    # JSON lines (one {"text": ...} per line; .xz/.gz/.bz2 read directly), K2-format tiktoken rank file,
    # 16 processes, one indexed file per input file -> out/train.shards/ (use "out/train" as a prefix):
    python tools/preprocess_data.py --input data/*.jsonl.gz --tokenizer tiktoken:/path/to/tiktoken.model \
        --output-prefix out/train --workers 16
    # every input into one indexed file (out/books.bin + .idx), in this process:
    python tools/preprocess_data.py --input books/*.txt --tokenizer default:4096 --output-prefix out/books
    # the bundled corpus itself (train + valid), into the cache the default run reads:
    python tools/preprocess_data.py --bundled-corpus --tokenizer default:4096
    # megatron's GPT dataset indices for a run of up to 3.77e9 samples, built once onto shared storage
    # (k2-pretrain loads them with data.index_dir=/shared/k2/gpt_indices):
    python tools/preprocess_data.py build-index --tokenizer tiktoken:/path/to/tiktoken.model \
        --seq-length 4096 --train-prefix out/train --valid-prefix out/valid --train-samples 3770000000 \
        --index-dir /shared/k2/gpt_indices

--tokenizer: default[:VOCAB] | bpe:<tokenizer.json> | tiktoken:<rank file or folder with tiktoken.model>.
--workers N parallelises over input files (give at least N files); each output file holds at most
--max-documents documents (megatron-core 0.19 numbers documents with int32: 2147483647 at most), a larger
input is split into parts. Errors are one line naming the file (and line), exit status 2.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k2_megatron.data import MAX_DOCUMENTS_PER_FILE, load_tokenizer  # noqa: E402

PROG = "preprocess_data.py"


def _preprocess_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="input files (.jsonl/.json/.ndjson or text; optionally .xz/.gz/.bz2)")
    src.add_argument("--bundled-corpus", action="store_true",
                     help="preprocess the corpus bundled with the package (train and valid) into the cache")
    parser.add_argument("--output-prefix", help="output path prefix: PREFIX.bin and PREFIX.idx, or with --workers "
                                                "the sharded dataset PREFIX.shards/")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes; one indexed file per input file, written as PREFIX.shards/ "
                             "(default: one process, every input into PREFIX.bin/.idx)")
    parser.add_argument("--max-documents", type=int, default=MAX_DOCUMENTS_PER_FILE,
                        help="documents per output file (default and maximum: %(default)s)")
    parser.add_argument("--tokenizer", default="default", help="tokenizer spec (default: %(default)s)")
    parser.add_argument("--json-key", default="text", help="document field of JSON lines (default: %(default)s)")
    parser.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                        help="auto: JSON lines for .jsonl/.json/.ndjson, else one document per file")
    parser.add_argument("--no-eod", action="store_true", help="do not append the end-of-document id")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: $K2_MEGATRON_CACHE or "
                                                          "~/.cache/k2_megatron)")
    return parser


def _progress(result: dict, done: int, total: int) -> None:
    tokens = sum(s["tokens"] for s in result["shards"])
    print(f"[{done}/{total}] {result['input']}: {len(result['shards'])} file(s), "
          f"{sum(s['documents'] for s in result['shards'])} documents, {tokens} tokens, "
          f"{tokens / max(result['seconds'], 1e-9):,.0f} tokens/s", file=sys.stderr, flush=True)


def _preprocess(argv) -> dict:
    parser = _preprocess_parser()
    args = parser.parse_args(argv)
    if args.input and not args.output_prefix:
        parser.error("--output-prefix is required with --input")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers: must be >= 1, got {args.workers}")
    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(args)
    if args.bundled_corpus:
        from k2_megatron.data import prepare_corpus_data

        data = prepare_corpus_data(tokenizer, cache_dir=args.cache_dir)
        return {"tokenizer": repr(tokenizer), "train_prefix": data.train_prefix, "valid_prefix": data.valid_prefix,
                "seconds": round(time.perf_counter() - t0, 2)}
    options = dict(json_key=args.json_key, input_format=args.input_format, append_eod=not args.no_eod,
                   max_documents=args.max_documents)
    if args.workers is None:
        from k2_megatron.data import preprocess_files

        t1 = time.perf_counter()
        stats = vars(preprocess_files(args.input, tokenizer, args.output_prefix, **options))
        seconds = time.perf_counter() - t1
        stats.update(workers=1, seconds=seconds, tokens_per_second=stats["tokens"] / max(seconds, 1e-9))
    else:
        from k2_megatron.data import preprocess_sharded

        stats = vars(preprocess_sharded(args.input, tokenizer, args.output_prefix, workers=args.workers,
                                        progress=_progress, **options))
        stats.pop("inputs")
    for key in ("tokens_per_second", "worker_tokens_per_second", "tokens_per_cpu_second"):
        if key in stats:
            stats[key] = round(stats[key])
    stats["seconds"] = round(stats["seconds"], 2)
    return {"tokenizer": repr(tokenizer), **stats}


def _load_tokenizer(args):
    try:
        return load_tokenizer(args.tokenizer, cache_dir=args.cache_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer {args.tokenizer}: {exc}") from None


def _build_index(argv) -> dict:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} build-index", description="Build megatron-core's GPT dataset indices (document, sample, "
        "shuffle and blending indices) offline into --index-dir, for a training run to load at startup "
        "(k2_megatron.data.dataset_index). An index of at least --train-samples samples of the same data "
        "already there is reused.")
    parser.add_argument("--tokenizer", required=True, help="tokenizer spec, as the run's data.tokenizer")
    parser.add_argument("--seq-length", type=int, required=True, help="the run's data.seq_length")
    parser.add_argument("--train-prefix", nargs="+", required=True, help="training dataset prefixes")
    parser.add_argument("--train-weights", nargs="+", type=float, default=None, help="blend weights")
    parser.add_argument("--valid-prefix", nargs="+", default=None, help="held-out dataset prefixes")
    parser.add_argument("--valid-samples", type=int, default=None, help="default: one pass over the held-out data")
    parser.add_argument("--train-samples", type=int, required=True,
                        help="training samples to cover (train.iters x global batch size, or more: a run of "
                             "fewer samples reuses the index)")
    parser.add_argument("--seed", type=int, default=1234, help="the run's data.seed (default: %(default)s)")
    parser.add_argument("--index-dir", required=True, help="directory of the indices (shared storage)")
    parser.add_argument("--cache-dir", default=None, help="tokenizer cache folder (for default tokenizers)")
    args = parser.parse_args(argv)
    from k2_megatron.data.dataset_index import build_dataset_index

    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(args)
    index = build_dataset_index(tokenizer, args.seq_length, args.train_prefix, args.valid_prefix,
                                train_samples=args.train_samples, index_dir=args.index_dir,
                                train_weights=args.train_weights, valid_samples=args.valid_samples, seed=args.seed)
    return {**vars(index), "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["build-index"]:
            result = _build_index(argv[1:])
        else:
            result = _preprocess(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was published", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, never a traceback: every error message names its file
        kind = "" if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: "
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"{PROG}: error: {kind}{text}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
