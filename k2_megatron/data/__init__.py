"""The data side of pretraining: bundled corpus, tokenizers, indexed datasets, resumable sample streams.

    from k2_megatron.data import prepare_corpus_data, build_pretraining_datasets, SampleStream, unigram_baseline
    data = prepare_corpus_data(vocab_size=4096)            # BPE + train/valid indexed datasets, cached
    train_ds, valid_ds = build_pretraining_datasets(data.tokenizer, seq_length, data.train_prefix,
                                                    data.valid_prefix, train_samples=iters * global_batch)
    stream = SampleStream(train_ds, micro_batch_size, dp_rank=r, dp_size=dp)   # state_dict / load_state_dict
    baseline = unigram_baseline(data.train_prefix, data.valid_prefix, data.tokenizer.vocab_size)
    preprocess_sharded(input_files, tokenizer, "out/train", workers=8)   # -> out/train.shards/, a prefix like any other
    build_dataset_index(tokenizer, seq_length, "out/train", train_samples=n, index_dir=d)   # offline, once
    train_ds, valid_ds = load_dataset_index(tokenizer, seq_length, "out/train", train_samples=n, index_dir=d)

The modules behind ``preprocess``, ``dataset`` and ``dataset_index`` names (megatron-core, multiprocessing) are
imported on first use of those names, so the corpus, tokenizer and indexed-file helpers load without megatron.
"""

import importlib

from k2_megatron.data.corpus import (CORPUS_DIR, HELD_OUT_DOCUMENTS, corpus_fingerprint, corpus_path, corpus_texts,
                                     iter_corpus_documents)
from k2_megatron.data.indexed import (MAX_BLEND_DATASETS, MAX_DOCUMENTS_PER_FILE, DatasetLimitError,
                                      IndexedDatasetWriter, check_indexed_dataset, dataset_shards)
from k2_megatron.data.tokenizer import (BPE_EOD_TOKEN, DEFAULT_VOCAB_SIZE, K2_EOD_TOKEN,
                                        K2_NUM_RESERVED_SPECIAL_TOKENS, K2_PAT_STR, BPETokenizer, TextTokenizer,
                                        TiktokenTokenizer, default_cache_dir, default_tokenizer,
                                        export_tiktoken_ranks, load_tiktoken_ranks, load_tokenizer,
                                        train_bpe_tokenizer)

_LAZY = {
    "k2_megatron.data.preprocess": ("IndexedDatasetStats", "PreparedData", "ShardedDatasetStats", "iter_documents",
                                    "prepare_corpus_data", "preprocess_files", "preprocess_sharded",
                                    "write_indexed_dataset"),
    "k2_megatron.data.dataset": ("DEFAULT_SEED", "DatasetExhaustedError", "SampleStream",
                                 "build_pretraining_datasets", "collate_samples", "resolve_blend", "token_counts",
                                 "unigram_baseline", "validation_batches"),
    "k2_megatron.data.dataset_index": ("DatasetIndex", "DatasetIndexError", "build_dataset_index",
                                       "load_dataset_index"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'k2_megatron.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["CORPUS_DIR", "HELD_OUT_DOCUMENTS", "corpus_fingerprint", "corpus_path", "corpus_texts",
           "iter_corpus_documents", "MAX_BLEND_DATASETS", "MAX_DOCUMENTS_PER_FILE", "DatasetLimitError",
           "IndexedDatasetWriter", "check_indexed_dataset", "dataset_shards", "BPE_EOD_TOKEN", "DEFAULT_VOCAB_SIZE",
           "K2_EOD_TOKEN", "K2_NUM_RESERVED_SPECIAL_TOKENS", "K2_PAT_STR", "BPETokenizer", "TextTokenizer",
           "TiktokenTokenizer", "default_cache_dir", "default_tokenizer", "export_tiktoken_ranks",
           "load_tiktoken_ranks", "load_tokenizer", "train_bpe_tokenizer", *_LAZY_NAMES]
