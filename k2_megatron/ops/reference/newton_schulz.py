"""Reference Newton-Schulz iteration (Muon; K2 report section 2)."""

from collections.abc import Sequence

import torch


def newton_schulz(x: torch.Tensor, coefficients: Sequence[float], eps: float) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of each matrix of ``x`` [..., m, n].

    X_0 = x / (||x||_F + eps) per matrix (norm in at least fp32), in the orientation with rows <= cols;
    then for each (a, b, c) in ``coefficients`` (flat, 3 per step):
        A = X X^T;  B = b A + c A A;  X = a X + B X
    with matmul operands in x's dtype (bf16 matmuls accumulate in fp32 and round their result to bf16).
    """
    transposed = x.shape[-2] > x.shape[-1]
    X = x.mT if transposed else x
    norm_dtype = torch.promote_types(x.dtype, torch.float32)
    Xn = X.to(norm_dtype)
    X = (Xn / (torch.linalg.matrix_norm(Xn, keepdim=True) + eps)).to(x.dtype)
    for a, b, c in zip(coefficients[0::3], coefficients[1::3], coefficients[2::3]):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return (X.mT if transposed else X).contiguous()
