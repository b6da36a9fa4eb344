#!/usr/bin/env python
"""Convert K2 / DeepSeek-V3 checkpoints: Hugging Face (BF16 / FP8) <-> megatron dist_checkpointing, or HF -> HF.

A thin wrapper of k2_megatron.checkpoint.convert_cli (run with --help for the options and examples).
"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser would torch.compile on a CPU

from k2_megatron.checkpoint.convert_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
