"""Pure-PyTorch references of every k2_megatron op, one module per op family: ``newton_schulz``, ``attention``,
``grouped_gemm``, ``moe_permute`` and ``fp8``. Import the module (``from k2_megatron.ops.reference import
moe_permute``): this package re-exports nothing, so no module hides behind a function of its name.

Each is the CPU implementation of its op and the oracle the CUDA kernels are tested against. They take
already-validated arguments (k2_megatron.ops validates) and run on any device and float dtype.
"""
