"""k2_megatron: Kimi K2-class training on megatron-core.

Ops (k2_megatron.ops) run fused CUDA kernels from the extension k2_megatron._C when it is built and the
tensor is on a supported GPU, and pure-PyTorch references otherwise; ``kernels_status()`` says which.
"""

from k2_megatron._extension import kernels_available, kernels_status
from k2_megatron.version import __version__

__all__ = ["__version__", "kernels_available", "kernels_status"]
