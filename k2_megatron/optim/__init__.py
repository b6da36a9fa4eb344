"""MuonClip: the optimizer of K2 (Muon + AdamW + QK-Clip), as pure functions and a torch optimizer."""

from k2_megatron.optim.muon import (MUON_UPDATE_SCALE, adamw_step_, apply_decoupled_update_, matrices_of_update,
                                    matrix_shape, muon_momentum_, muon_orthogonalize, muon_scale, row_matrices,
                                    set_row_matrices)
from k2_megatron.optim.muonclip import (DEFAULT_ADAMW_PATTERNS, MuonClip, NonFiniteGradientError, QKClipStats,
                                        muon_param_groups, uses_muon)
from k2_megatron.optim.qk_clip import (QK_CLIP_ALPHA, QK_CLIP_TAU, MLAHeadLayout, WeightShard, qk_clip_,
                                       qk_clip_factors)

__all__ = [
    "DEFAULT_ADAMW_PATTERNS", "MUON_UPDATE_SCALE", "QK_CLIP_ALPHA", "QK_CLIP_TAU", "MLAHeadLayout", "MuonClip",
    "NonFiniteGradientError", "QKClipStats", "WeightShard", "adamw_step_", "apply_decoupled_update_",
    "matrices_of_update", "matrix_shape", "muon_momentum_", "muon_orthogonalize", "muon_param_groups", "muon_scale",
    "qk_clip_", "qk_clip_factors", "row_matrices", "set_row_matrices", "uses_muon",
]
