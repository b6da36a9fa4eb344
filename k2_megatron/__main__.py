"""`python -m k2_megatron`: version, torch, which op implementation is live here, and which kernels each GPU
generation runs with this build (and why)."""

import torch

import k2_megatron
from k2_megatron import _extension

print(f"k2_megatron {k2_megatron.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print(f"ops: {k2_megatron.kernels_status()}")
if _extension.extension_loaded():
    ptx = _extension.ptx_arch()
    print(f"k2_megatron._C: SASS for {', '.join(f'sm_{a}' for a in _extension.compiled_archs())}; "
          + (f"compute_{ptx} PTX for newer GPUs" if ptx else "no PTX for newer GPUs"))
    print("kernels per GPU generation:")
    for line in _extension.kernel_paths_report():
        print(f"  {line}")
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("k2_megatron::"))
    print(f"registered: {', '.join(ops)}")
