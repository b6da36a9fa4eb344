"""Argument validation shared by the ops: messages name the argument, the expected and the actual value."""

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, *, min_dim: int | None = None, ndim: int | None = None,
                 dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {_names(dtypes)}, got {t.dtype}")


def check_same_device(op: str, name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.device != other.device:
        raise ValueError(f"{op}: {name} must be on the same device as {other_name} ({other.device}), got {t.device}")


def check_kernel_dtype(op: str, name: str, t: torch.Tensor, dtypes) -> None:
    """For tensors that will run the CUDA kernel, whose dtype set is narrower than the reference's."""
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: the CUDA kernel takes {name} in {_names(dtypes)}, got {t.dtype} "
                        f"(other float dtypes run through the reference on CPU)")


def _names(dtypes) -> str:
    return "{" + ", ".join(str(d).replace("torch.", "") for d in dtypes) + "}"
