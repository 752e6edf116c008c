"""Custom Metal kernels (via `mx.fast.metal_kernel`) with pure-MLX references of the same signature.

Each public function runs its Metal kernel when MLX has Metal and `MLX_UNIFIED_KERNELS` is not `0`,
and its reference otherwise (see `dispatch`).  `python -m mlx_unified.kernels.selfcheck [--emulate]`
proves them against the references, on Metal or on the CPU emulator.
"""

from mlx_unified.kernels.attention_global import global_kv_attention, quantized_global_kv_attention
from mlx_unified.kernels.attention_sliding import quantized_sliding_window_attention, sliding_window_attention
from mlx_unified.kernels.audio_norm import audio_norm
from mlx_unified.kernels.dispatch import kernels_enabled
from mlx_unified.kernels.norm_rope import norm_rope
from mlx_unified.kernels.rope_tables import DEFAULT_ROPE, PROPORTIONAL_ROPE, RopeSpec
from mlx_unified.kernels.vision_tail import vision_tail

__all__ = [
    "DEFAULT_ROPE",
    "PROPORTIONAL_ROPE",
    "RopeSpec",
    "audio_norm",
    "global_kv_attention",
    "kernels_enabled",
    "norm_rope",
    "quantized_global_kv_attention",
    "quantized_sliding_window_attention",
    "sliding_window_attention",
    "vision_tail",
]
