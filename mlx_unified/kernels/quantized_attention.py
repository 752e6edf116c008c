"""Attention over a quantized KV cache with MLX's quantized primitives, never dequantizing it whole.

Scores and the weighted sum of values are `mx.quantized_matmul`s straight over the packed cache
(`(packed, scales, biases)` as `mx.quantize` returns them), in float32, as mlx-lm's
`quantized_scaled_dot_product_attention` computes them. This serves prefill (a block of queries at a
time, `attention.prefill_attention`) and decoding wherever the Metal kernels do not run (the CPU and
CUDA backends).

Global K=V layers cache only `v`; their keys are `rope(k_norm_weight * v)`. RoPE mixes dims i and
i + D/2 by a position-dependent angle, so the rotated dims cannot be scored from the packed values in
one product. They are few (the proportional RoPE rotates 128 of 512 dims): `DerivedKeys` dequantizes
only the groups that hold them and rotates those, and scores the other dims with a quantized product
of the queries times `k_norm_weight` (zero on the rotated dims) against the packed values.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_unified.config import RopeSpec
from mlx_unified.kernels.rope_tables import inv_freq, rope_reference, rotated_pairs

# What `mx.quantize` returns: packed uint32 values, per-group scales, per-group biases.
Quantized = tuple[mx.array, mx.array, mx.array]


def dequantize(x: Quantized, group_size: int, bits: int) -> mx.array:
    """float32 values of a quantized tensor: scale * q + bias computed in float32 (MLX's own
    dequantize rounds each step to the scales' dtype)."""
    packed, scales, biases = x
    return mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size, bits)


def dequantize_dims(x: Quantized, start: int, stop: int, group_size: int, bits: int) -> mx.array:
    """float32 values of dims [start, stop) of the last axis, dequantizing only the groups holding them."""
    first, last = start // group_size, -(-stop // group_size)
    per_word = 32 // bits
    packed, scales, biases = x
    part = dequantize(
        (
            packed[..., first * group_size // per_word : last * group_size // per_word],
            scales[..., first:last],
            biases[..., first:last],
        ),
        group_size,
        bits,
    )
    return part[..., start - first * group_size : stop - first * group_size]


def _slice(x: Quantized, start: int, stop: int) -> Quantized:
    return tuple(a[:, :, start:stop] for a in x)


@dataclass(frozen=True)
class QuantizedKeys:
    """Keys stored quantized (sliding layers; global layers of configs without K=V)."""

    keys: Quantized
    group_size: int
    bits: int

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def sliced(self, start: int, stop: int) -> QuantizedKeys:
        return QuantizedKeys(_slice(self.keys, start, stop), self.group_size, self.bits)

    def scores(self, queries: mx.array) -> mx.array:
        """queries float32 [B, n_kv, rows, D] -> float32 scores [B, n_kv, rows, T]."""
        return mx.quantized_matmul(queries, *self.keys, transpose=True, group_size=self.group_size, bits=self.bits)

    def dense(self) -> mx.array:
        """float32 keys [B, n_kv, T, D] (for observers, which take explicit keys)."""
        return dequantize(self.keys, self.group_size, self.bits)


@dataclass(frozen=True)
class DerivedKeys:
    """The keys of a K=V layer, rope(k_norm_weight * v) at positions start.., from its quantized v.

    `unrotated_weight` is k_norm_weight with the rotated dims zeroed; `rotated` holds the keys'
    rotated dims, float32 [B, n_kv, T, 2 * pairs] (dims [0, pairs) then [D/2, D/2 + pairs))."""

    values: Quantized
    unrotated_weight: mx.array
    rotated: mx.array
    pairs: int
    start: int
    k_norm_weight: mx.array
    rope: RopeSpec
    group_size: int
    bits: int

    @classmethod
    def build(
        cls, values: Quantized, k_norm_weight: mx.array, start: int, rope: RopeSpec, group_size: int, bits: int
    ) -> DerivedKeys:
        head_dim = k_norm_weight.shape[0]
        half, pairs = head_dim // 2, rotated_pairs(rope, head_dim)
        weight = k_norm_weight.astype(mx.float32)
        first = dequantize_dims(values, 0, pairs, group_size, bits) * weight[:pairs]
        second = dequantize_dims(values, half, half + pairs, group_size, bits) * weight[half : half + pairs]
        positions = mx.arange(start, start + values[0].shape[2]).astype(mx.float32)
        angle = positions[:, None] * inv_freq(rope, head_dim)[None, :pairs]
        cos, sin = mx.cos(angle), mx.sin(angle)
        rotated = mx.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
        dims = mx.arange(head_dim)
        in_pair = (dims < pairs) | ((dims >= half) & (dims < half + pairs))
        unrotated = mx.where(in_pair, 0.0, weight)
        return cls(values, unrotated, rotated, pairs, start, k_norm_weight, rope, group_size, bits)

    @property
    def length(self) -> int:
        return self.values[0].shape[2]

    def sliced(self, start: int, stop: int) -> DerivedKeys:
        return DerivedKeys(
            _slice(self.values, start, stop), self.unrotated_weight, self.rotated[:, :, start:stop], self.pairs,
            self.start + start, self.k_norm_weight, self.rope, self.group_size, self.bits,
        )  # fmt: skip

    def scores(self, queries: mx.array) -> mx.array:
        """queries float32 [B, n_kv, rows, D] -> float32 scores [B, n_kv, rows, T]."""
        half, pairs = queries.shape[-1] // 2, self.pairs
        rotated_queries = mx.concatenate([queries[..., :pairs], queries[..., half : half + pairs]], axis=-1)
        if 2 * pairs == queries.shape[-1]:
            return rotated_queries @ self.rotated.swapaxes(-1, -2)
        scores = mx.quantized_matmul(
            queries * self.unrotated_weight, *self.values, transpose=True, group_size=self.group_size, bits=self.bits
        )
        # Added in place of a second score-sized array.
        return mx.addmm(scores, rotated_queries, self.rotated.swapaxes(-1, -2))

    def dense(self) -> mx.array:
        """float32 keys [B, n_kv, T, D] (for observers, which take explicit keys)."""
        v = dequantize(self.values, self.group_size, self.bits) * self.k_norm_weight.astype(mx.float32)
        return rope_reference(v, mx.arange(self.start, self.start + self.length), self.rope)


def quantized_attention(
    queries: mx.array,
    keys: QuantizedKeys | DerivedKeys,
    values: Quantized,
    mask: mx.array | None,
) -> mx.array:
    """softmax(q k^T + mask) v with scale 1.0 over quantized keys and values, float32 scores and
    soft-max. queries [B, H, L, D]; mask: additive float32 scores, [L, T] (or [B, 1, L, T], or [T]),
    or None. Returns [B, H, L, D] in the queries' dtype."""
    batch, heads, length, head_dim = queries.shape
    n_kv = values[0].shape[1]
    group = heads // n_kv
    # Rows g * L + l for query head kv_head * G + g: the products then match the cache's batch axes
    # one to one (broadcasting a KV head over its G query heads made MLX's CPU backend copy the cache).
    q = queries.astype(mx.float32).reshape(batch, n_kv, group * length, head_dim)
    scores = keys.scores(q)
    if mask is not None:
        by_query = scores.reshape(batch, n_kv, group, length, -1)
        scores = (by_query + (mask[:, :, None] if mask.ndim == 4 else mask)).reshape(scores.shape)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *values, transpose=False, group_size=keys.group_size, bits=keys.bits)
    return out.reshape(batch, heads, length, head_dim).astype(queries.dtype)


def quantized_shape(x: Quantized, group_size: int, bits: int) -> tuple[int, ...]:
    """The shape of the tensor `x` quantizes; refuses a triple whose parts disagree with the settings."""
    packed, scales, biases = x
    shape = (*packed.shape[:-1], packed.shape[-1] * 32 // bits)
    if scales.shape != biases.shape or scales.shape[:-1] != packed.shape[:-1] or scales.shape[-1] * group_size != shape[-1]:
        raise ValueError(
            f"packed {packed.shape}, scales {scales.shape}, biases {biases.shape} are not one tensor "
            f"quantized to {bits} bits in groups of {group_size}"
        )
    return shape
