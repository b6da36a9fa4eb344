r"""Turn raw text / JSON lines into a megatron-core indexed dataset (<prefix>.bin + <prefix>.idx).

Thin command line over ``k2_megatron.data.preprocess_files``: one sequence per document, the tokenizer's
end-of-document id appended (unless --no-eod).

    # JSON lines (one {"text": ...} per line; .xz/.gz/.bz2 read directly), K2-format tiktoken rank file:
    python tools/preprocess_data.py --input data/*.jsonl.gz --tokenizer tiktoken:/path/to/tiktoken.model \
        --output-prefix out/train
    # plain text files, one document per file, the bundled corpus's BPE (trained and cached on first use):
    python tools/preprocess_data.py --input books/*.txt --tokenizer default:4096 --output-prefix out/books
    # the bundled corpus itself (train + valid), into the cache the default run reads:
    python tools/preprocess_data.py --bundled-corpus --tokenizer default:4096

--tokenizer: default[:VOCAB] | bpe:<tokenizer.json> | tiktoken:<rank file or folder with tiktoken.model>.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from k2_megatron.data import load_tokenizer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="input files (.jsonl/.json/.ndjson or text; optionally .xz/.gz/.bz2)")
    src.add_argument("--bundled-corpus", action="store_true",
                     help="preprocess the corpus bundled with the package (train and valid) into the cache")
    parser.add_argument("--output-prefix", help="output path prefix: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="default", help="tokenizer spec (default: %(default)s)")
    parser.add_argument("--json-key", default="text", help="document field of JSON lines (default: %(default)s)")
    parser.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                        help="auto: JSON lines for .jsonl/.json/.ndjson, else one document per file")
    parser.add_argument("--no-eod", action="store_true", help="do not append the end-of-document id")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: $K2_MEGATRON_CACHE or "
                                                          "~/.cache/k2_megatron)")
    args = parser.parse_args(argv)
    if args.input and not args.output_prefix:
        parser.error("--output-prefix is required with --input")

    t0 = time.time()
    tokenizer = load_tokenizer(args.tokenizer, cache_dir=args.cache_dir)
    if args.bundled_corpus:
        from k2_megatron.data import prepare_corpus_data

        data = prepare_corpus_data(tokenizer, cache_dir=args.cache_dir)
        result = {"tokenizer": repr(tokenizer), "train_prefix": data.train_prefix, "valid_prefix": data.valid_prefix}
    else:
        from k2_megatron.data import preprocess_files

        stats = preprocess_files(args.input, tokenizer, args.output_prefix, json_key=args.json_key,
                                 input_format=args.input_format, append_eod=not args.no_eod)
        result = {"tokenizer": repr(tokenizer), **vars(stats)}
    result["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
