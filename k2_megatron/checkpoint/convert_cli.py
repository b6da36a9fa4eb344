"""Command line of the checkpoint converter (tools/convert_checkpoint.py; console script ``k2-convert-checkpoint``
once setup.py declares ``k2_megatron.checkpoint.convert_cli:main``).

Convert K2 / DeepSeek-V3 checkpoints: Hugging Face (BF16 / FP8) <-> megatron dist_checkpointing, or HF -> HF.

Examples:
  # release FP8 -> BF16 Hugging Face shards (re-shard, dequantise, validate tensor by tensor)
  python tools/convert_checkpoint.py hf-to-hf  --src Kimi-K2-Base --dst k2-bf16 --dtype bf16 --validate
  # Hugging Face -> megatron (a torch_dist checkpoint; megatron reshards it on load into any TP/PP/EP)
  python tools/convert_checkpoint.py hf-to-megatron --src k2-tiny-hf --dst k2-tiny-megatron --validate
  # megatron -> Hugging Face, FP8 export with 128x128 block scales
  python tools/convert_checkpoint.py megatron-to-hf --src k2-tiny-megatron --dst k2-tiny-fp8 --fp8-export

Every direction validates the input before anything is written, writes into a temporary directory next
to --dst and renames it into place at the end (an existing --dst is replaced only with --overwrite, and
only once the new one is complete). At the end it prints tensors, bytes, seconds, MB/s (tensor bytes read
per second) and the peak resident memory above the start (VmHWM, reset through /proc/self/clear_refs).
--validate: hf-to-hf compares every output tensor with the input (exact, or within bf16 / FP8 rounding where
the conversion narrows: see k2_megatron.checkpoint.convert.validate_hf_conversion); megatron-to-hf compares
every output tensor with the megatron checkpoint likewise; both megatron directions then compare transformers'
logits with our megatron model's (small models: both are built in memory; not after --fp8-export / --dtype).
"""

from __future__ import annotations

import argparse
import os
import sys

LOGITS_ATOL = 1e-4  # float32 transformers vs megatron on small models (measured ~2e-6 on k2-tiny)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf", "hf-to-hf"])
    p.add_argument("--src", required=True, help="input directory")
    p.add_argument("--dst", required=True, help="output directory (created atomically)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32", "keep"],
                   help="output dtype of float tensors (default: keep; FP8 dequantises to bf16; hf-to-megatron: "
                        "the model's parameter dtype, default bf16 for BF16/FP8 sources and fp32 for FP32)")
    p.add_argument("--fp8-export", action="store_true",
                   help="write linear weights as float8_e4m3fn + weight_scale_inv (128x128 blocks)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB (HF outputs)")
    p.add_argument("--model-type", default=None, choices=["kimi_k2", "deepseek_v3"],
                   help="model_type of the output config.json (default: the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst (atomically, at the end)")
    p.add_argument("--validate", action="store_true", help="compare the output with the input after converting")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser would torch.compile on a CPU
    from k2_megatron.checkpoint import convert
    from k2_megatron.checkpoint.errors import CheckpointError

    progress = not args.no_progress
    try:
        if args.direction == "hf-to-hf":
            stats = convert.convert_hf_to_hf(args.src, args.dst, dtype=args.dtype, fp8_export=args.fp8_export,
                                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                             model_type=args.model_type, progress=progress)
        elif args.direction == "hf-to-megatron":
            if args.fp8_export or args.model_type:
                raise CheckpointError("--fp8-export and --model-type apply to Hugging Face outputs only")
            stats = convert.convert_hf_to_megatron(args.src, args.dst, params_dtype=args.dtype,
                                                   overwrite=args.overwrite, progress=progress)
        else:
            stats = convert.convert_megatron_to_hf(args.src, args.dst, dtype=args.dtype, fp8_export=args.fp8_export,
                                                   max_shard_size=args.max_shard_size, model_type=args.model_type,
                                                   overwrite=args.overwrite, progress=progress)
    except (CheckpointError, ValueError) as exc:
        print(f"convert_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    print(stats.summary())
    if args.validate:
        return _validate(args, convert)
    return 0


def _validate(args, convert) -> int:
    if args.direction == "hf-to-hf":
        ok, lines = convert.validate_hf_conversion(args.src, args.dst)
        for line in lines[:-1]:
            print(f"validate: {line}", file=sys.stderr)
        print(f"validate: {lines[-1]}: {'ok' if ok else 'FAILED'}")
        return 0 if ok else 1
    hf_dir, meg_dir = (args.src, args.dst) if args.direction == "hf-to-megatron" else (args.dst, args.src)
    if args.direction == "megatron-to-hf":
        ok, lines = convert.validate_megatron_conversion(meg_dir, hf_dir)
        for line in lines[:-1]:
            print(f"validate: {line}", file=sys.stderr)
        print(f"validate: {lines[-1]}: {'ok' if ok else 'FAILED'}")
        if not ok:
            return 1
        if args.fp8_export or args.dtype not in (None, "keep"):
            print("validate: logits not compared (the output was rounded to FP8 / another dtype; the tensor "
                  "comparison above bounds that rounding)")
            return 0
    diff = convert.compare_logits(hf_dir, meg_dir)
    ok = diff <= LOGITS_ATOL
    print(f"validate: logits max |transformers - megatron| = {diff:.3g} (tolerance {LOGITS_ATOL:g}): "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1

