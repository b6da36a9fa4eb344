// Argument checks at the C++ edge of the CUDA implementations. The Python op layer validates first with
// friendlier messages; these keep a direct torch.ops call from reaching a kernel with bad input.
#pragma once

#include <c10/util/Exception.h>

#define K2_CHECK_CUDA(op, x) TORCH_CHECK((x).is_cuda(), op, ": ", #x, " must be a CUDA tensor, got ", (x).device())
#define K2_CHECK_DTYPE(op, x, cond, expected) \
  TORCH_CHECK(cond, op, ": ", #x, " must be ", expected, ", got ", (x).scalar_type())
#define K2_CHECK_MIN_DIM(op, x, n) \
  TORCH_CHECK((x).dim() >= (n), op, ": ", #x, " must have at least ", n, " dimensions, got shape ", (x).sizes())
#define K2_CHECK_CUDA_LAUNCH(op, err) \
  TORCH_CHECK((err) == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err))
