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

from mlx_unified.attention_blocks import QUANTIZED_ATTENTION_PEAK, quantized_key_bytes
from mlx_unified.config import RopeSpec
from mlx_unified.kernels.rope_tables import rope_periods, rope_reference, rotated_pairs

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

    def bytes_per_key(self, rows: int) -> int:
        return quantized_key_bytes(rows)

    def scores(self, queries: mx.array) -> mx.array:
        """queries float32 [B, n_kv, rows, D] -> float32 scores [B, n_kv, rows, T]."""
        return mx.quantized_matmul(queries, *self.keys, transpose=True, group_size=self.group_size, bits=self.bits)

    def dense(self) -> mx.array:
        """float32 keys [B, n_kv, T, D] (for observers, which take explicit keys)."""
        return dequantize(self.keys, self.group_size, self.bits)


@dataclass(frozen=True)
class DerivedKeys:
    """The keys of a K=V layer, rope(k_norm_weight * v) at positions start.., from its quantized v.

    Scoring rotates only the dims RoPE turns (dims [0, pairs) and [D/2, D/2 + pairs)), dequantized
    from the groups that hold them, for the keys being scored; the other dims are scored by a quantized
    product of the queries times k_norm_weight (zero on the rotated dims) with the packed values."""

    values: Quantized
    k_norm_weight: mx.array
    start: int
    rope: RopeSpec
    group_size: int
    bits: int

    @property
    def length(self) -> int:
        return self.values[0].shape[2]

    def sliced(self, start: int, stop: int) -> DerivedKeys:
        return DerivedKeys(
            _slice(self.values, start, stop), self.k_norm_weight, self.start + start, self.rope, self.group_size,
            self.bits,
        )  # fmt: skip

    def bytes_per_key(self, rows: int) -> int:
        return quantized_key_bytes(rows, 2 * rotated_pairs(self.rope, self.k_norm_weight.shape[0]))

    def _rotated(self, head_dim: int) -> mx.array:
        """float32 [B, n_kv, T, 2 * pairs]: the rotated dims of these keys, pairs (i, pairs + i)."""
        half, pairs = head_dim // 2, rotated_pairs(self.rope, head_dim)
        weight = self.k_norm_weight.astype(mx.float32)
        x = mx.concatenate(
            [
                dequantize_dims(self.values, 0, pairs, self.group_size, self.bits),
                dequantize_dims(self.values, half, half + pairs, self.group_size, self.bits),
            ],
            axis=-1,
        ) * mx.concatenate([weight[:pairs], weight[half : half + pairs]])
        # MLX's fused RoPE over the 2 * pairs dims pairs (i, pairs + i) with the model's frequencies: the
        # rotation the float path gives these dims (`rope_tables.rope_fused`).
        periods = rope_periods(self.rope, head_dim)[:pairs]
        return mx.fast.rope(x, 2 * pairs, traditional=False, base=None, scale=1.0, offset=self.start, freqs=periods)

    def scores(self, queries: mx.array) -> mx.array:
        """queries float32 [B, n_kv, rows, D] -> float32 scores [B, n_kv, rows, T]."""
        head_dim = queries.shape[-1]
        half, pairs = head_dim // 2, rotated_pairs(self.rope, head_dim)
        rotated_queries = mx.concatenate([queries[..., :pairs], queries[..., half : half + pairs]], axis=-1)
        rotated_keys = self._rotated(head_dim).swapaxes(-1, -2)
        if 2 * pairs == head_dim:
            return rotated_queries @ rotated_keys
        dims = mx.arange(head_dim)
        in_pair = (dims < pairs) | ((dims >= half) & (dims < half + pairs))
        unrotated = mx.where(in_pair, 0.0, self.k_norm_weight.astype(mx.float32))
        scores = mx.quantized_matmul(
            queries * unrotated, *self.values, transpose=True, group_size=self.group_size, bits=self.bits
        )
        return mx.addmm(scores, rotated_queries, rotated_keys)  # no second score-sized array

    def dense(self) -> mx.array:
        """float32 keys [B, n_kv, T, D] (for observers, which take explicit keys)."""
        v = dequantize(self.values, self.group_size, self.bits) * self.k_norm_weight.astype(mx.float32)
        return rope_reference(v, mx.arange(self.start, self.start + self.length), self.rope)


def key_block(keys: QuantizedKeys | DerivedKeys, rows: int, score_bytes: int) -> int:
    """Keys attended at a time by `rows` query rows (all heads): all of them when what that takes
    (`attention_blocks.quantized_key_bytes`) fits `score_bytes`, else blocks small enough that the
    QUANTIZED_ATTENTION_PEAK blocks a merge keeps alive fit it; at least MIN_KEY_BLOCK."""
    per_key = keys.bytes_per_key(rows)
    if per_key * keys.length <= score_bytes:
        return keys.length
    return max(score_bytes // (QUANTIZED_ATTENTION_PEAK * per_key), MIN_KEY_BLOCK)


# Fewer keys a block would make the per-block work (a few small products) dominate.
MIN_KEY_BLOCK = 1024
# Decoding's bound on one key block's scores: a few query rows see every cached key.
DECODE_SCORE_BYTES = 64 << 20


def quantized_attention(
    queries: mx.array,
    keys: QuantizedKeys | DerivedKeys,
    values: Quantized,
    mask: mx.array | None,
    score_bytes: int = DECODE_SCORE_BYTES,
) -> mx.array:
    """softmax(q k^T + mask) v with scale 1.0 over quantized keys and values, float32 scores and
    soft-max. queries [B, H, L, D]; mask: additive float32 scores, [L, T] (or [B, 1, L, T], or [T]),
    or None. Returns [B, H, L, D] in the queries' dtype.

    Keys are attended a block at a time (`key_block`) so that one block's scores, and on K=V layers
    its derived keys, fit `score_bytes`; blocks are merged with the running maximum and sum of the
    soft-max (as the decode kernels merge their chunks). A context that fits is one block."""
    batch, heads, length, head_dim = queries.shape
    n_kv = values[0].shape[1]
    group = heads // n_kv
    # Rows g * L + l for query head kv_head * G + g: the products then match the cache's batch axes
    # one to one (broadcasting a KV head over its G query heads made MLX's CPU backend copy the cache).
    q = queries.astype(mx.float32).reshape(batch, n_kv, group * length, head_dim)
    size = key_block(keys, heads * length, score_bytes)
    total = keys.length
    if total <= size:
        weights = mx.softmax(_masked_scores(keys, q, mask, 0, total, group, length), axis=-1, precise=True)
        out = mx.quantized_matmul(weights, *values, transpose=False, group_size=keys.group_size, bits=keys.bits)
    else:
        # m: running maximum, finite at first, so that a block a query is masked from entirely gives
        # exp(-inf - m) = 0; denom: the running soft-max denominator.
        m = mx.full((*q.shape[:-1], 1), -3.0e38, dtype=mx.float32)
        denom = mx.zeros_like(m)
        out = mx.zeros(q.shape, dtype=mx.float32)
        for start in range(0, total, size):
            stop = min(start + size, total)
            scores = _masked_scores(keys.sliced(start, stop), q, mask, start, stop, group, length)
            m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
            p = mx.exp(scores - m_new)
            correction = mx.exp(m - m_new)
            denom = denom * correction + p.sum(axis=-1, keepdims=True)
            block_values = _slice(values, start, stop)
            out = out * correction + mx.quantized_matmul(
                p, *block_values, transpose=False, group_size=keys.group_size, bits=keys.bits
            )
            m = m_new
        out = out / denom
    return out.reshape(batch, heads, length, head_dim).astype(queries.dtype)


def _masked_scores(
    keys: QuantizedKeys | DerivedKeys, q: mx.array, mask: mx.array | None, start: int, stop: int, group: int,
    length: int,
) -> mx.array:  # fmt: skip
    """Scores of rows q over keys [start, stop) of `keys` (already sliced there when not whole), with
    the mask's columns start..stop added."""
    scores = keys.scores(q)
    if mask is None:
        return scores
    mask = mask[..., start:stop]
    by_query = scores.reshape(*scores.shape[:2], group, length, stop - start)
    return (by_query + (mask[:, :, None] if mask.ndim == 4 else mask)).reshape(scores.shape)


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
