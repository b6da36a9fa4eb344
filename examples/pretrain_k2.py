"""Pretrain K2 with megatron-core and MuonClip. With no arguments: k2-tiny on the bundled corpus, on this machine.

    python examples/pretrain_k2.py                                             # tiny, CPU, a few minutes
    python examples/pretrain_k2.py train.iters=50 output.dir=runs/quick        # dotted overrides
    torchrun --nproc-per-node 2 examples/pretrain_k2.py train.iters=20         # two processes (gloo on CPU)
    python examples/pretrain_k2.py --config examples/configs/k2_mini_1gpu.yaml # k2-mini on one GPU
    python examples/pretrain_k2.py --config examples/configs/k2_full.yaml --dry-run   # the paper's layout, planned

The same as the ``k2-pretrain`` console command (k2_megatron.training.pretrain:main).
"""

import sys

from k2_megatron.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
