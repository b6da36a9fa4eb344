"""`python -m k2_megatron`: version, torch and which op implementation is live."""

import torch

import k2_megatron
from k2_megatron._extension import extension_loaded

print(f"k2_megatron {k2_megatron.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print(f"ops: {k2_megatron.kernels_status()}")
if extension_loaded():
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("k2_megatron::"))
    print(f"registered: {', '.join(ops)}")
