"""Audio emphasis: steering the global layers' attention toward a recording.

Scaling the attention probabilities outside the audio span by `emphasis` and renormalizing equals
adding -log(emphasis) to the scores of the span's keys (post-hoc attention steering). That bias is a
`SpanBias`, which the masks (prefill), the global-layer decode kernel and the prefix cache's names take.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .config import TOKEN_TYPES


class SpanBias(NamedTuple):
    """Additive bias on the scores of keys at positions `[start, stop)`."""

    start: int
    stop: int
    value: float


def audio_emphasis_bias(
    input_ids: np.ndarray, mm_token_type_ids: np.ndarray | None, audio_token_id: int, emphasis: float
) -> SpanBias | None:
    """The global-layer key bias for `audio_emphasis = emphasis`, or None when off.

    With several clips the span runs from the first audio token to the last (text between clips is
    emphasized too). 1.0 (the default) builds no bias at all, so the model runs exactly as without the
    option.
    """
    try:
        value = float(emphasis)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:  # also refuses NaN
        raise ValueError(
            f"audio_emphasis must be a number in (0, 1] (1 = off, smaller = more attention to the audio), "
            f"got {emphasis!r}"
        )
    if value == 1.0:
        return None
    ids = np.asarray(input_ids).reshape(-1)
    is_audio = (
        ids == audio_token_id
        if mm_token_type_ids is None
        else np.asarray(mm_token_type_ids).reshape(-1) == TOKEN_TYPES["audio"]
    )
    positions = np.nonzero(is_audio)[0]
    if len(positions) == 0:
        return None  # no audio: nothing to emphasize
    return SpanBias(int(positions[0]), int(positions[-1]) + 1, -math.log(value))
