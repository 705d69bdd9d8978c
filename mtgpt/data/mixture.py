"""Weighted data mixtures: which source each global position of the training order draws from.

The source of global position g (all ranks together, counted from the run's start) is a pure
function of (seed, g): a uniform number from a counter-based hash (splitmix64 of seed and g) goes
through the weights' cumulative distribution. So every rank computes the same sources for the
whole global micro-step, the realised shares converge to the weights with binomial error, and a
resume needs only the position and, to be cheap, the per-source draw counts at that position
(`counts_at` rebuilds them from scratch when a checkpoint lacks them). Within a source, its k-th
draw is sample `Order(n_s, seed, s)[k]` of that source (mtgpt.data.loader.Draws).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def uniforms(seed: int, positions: np.ndarray, key: np.uint64 | None = None) -> np.ndarray:
    """A uniform in [0, 1) for each position, the same for the same (seed, position) anywhere.
    (`key`: the seed's, `_key(seed)`, when the caller has it.)"""
    key = _key(seed) if key is None else key
    with np.errstate(over="ignore"):
        bits = _splitmix64(positions.astype(np.uint64) * _GOLDEN ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _key(seed: int) -> np.uint64:
    return _splitmix64(np.array([seed], dtype=np.uint64))[0]


class Mixture:
    """Global position -> source index, for sources with the given weights (any positive scale)."""

    def __init__(self, weights: list[float], seed: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
        self.weights = w / w.sum()
        self.cdf = np.cumsum(self.weights)
        self.cdf[-1] = 1.0
        self.seed, self._key = seed, _key(seed)

    def sources(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.cdf, uniforms(self.seed, positions, self._key), side="right").astype(np.int64)

    def counts_at(self, position: int, chunk: int = 1 << 22) -> np.ndarray:
        """Draws of each source before global `position` (what a checkpoint saves)."""
        counts = np.zeros(len(self.weights), dtype=np.int64)
        for begin in range(0, position, chunk):
            counts += np.bincount(self.sources(np.arange(begin, min(position, begin + chunk))),
                                  minlength=len(self.weights))
        return counts

    def draws(self, start: int, n: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For global positions start..start+n-1, given `counts` at `start`: (source of each, its
        draw index within that source, the counts after them)."""
        src = self.sources(np.arange(start, start + n, dtype=np.int64))
        index = np.empty(n, dtype=np.int64)
        after = counts.copy()
        for s in range(len(self.weights)):
            here = src == s
            k = int(here.sum())
            index[here] = after[s] + np.arange(k)
            after[s] += k
        return src, index, after
