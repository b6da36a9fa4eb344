"""`python -m k2_megatron`: version, torch, which op implementation is live here, and which kernels each GPU
generation runs with this build (and why)."""

import torch

import k2_megatron
from k2_megatron import _extension

print(f"k2_megatron {k2_megatron.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print(f"ops: {k2_megatron.kernels_status()}")
if _extension.extension_loaded():
    print(f"k2_megatron._C: {_extension.built_for()} (the PTX for GPUs without SASS)")
    print("kernels per GPU generation:")
    for line in _extension.kernel_paths_report():
        print(f"  {line}")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("k2_megatron::"))
    print(f"registered: {', '.join(ops)}")
