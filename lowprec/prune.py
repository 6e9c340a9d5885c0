"""Magnitude pruning on plain NumPy arrays: keep-masks, schedules and reports.

Every function returns boolean keep-masks (True = keep); nothing is wrapped,
hooked or modified in place. Pack the result with
``lowprec.sparse.from_dense(w, mask, format=...)`` to get a smaller file and a
faster product.

Patterns of :func:`magnitude`:

    "unstructured"    the round(sparsity * size) smallest |w| are pruned
    (n, m)            n of every m consecutive entries along ``axis`` (the
                      reduction axis, default -1: K of a (M, K) weight) are kept
    ("block", r, c)   r x c blocks of a 2-D weight scored by their L1 (default)
                      or L2 norm; the lowest round(sparsity * blocks) pruned
    "channel"         whole output rows / filters (index 0 of ``w``) scored by
                      the norm of everything else

Ties are broken by position (a stable sort), so masks are deterministic.
"""

from __future__ import annotations

import fnmatch
import math
import numbers

import numpy as np

from . import _validate as v

_NORMS = ("l1", "l2")


def _check_sparsity(sparsity, name="sparsity") -> float:
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool):
        msg = f"{name} must be a number in [0, 1), got {type(sparsity).__name__}"
        raise TypeError(msg)
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        msg = (
            f"{name} must be in [0, 1) (the fraction of entries removed), got "
            f"{sparsity!r}"
        )
        raise ValueError(msg)
    return s


def _check_weight(w, name="w"):
    v.check_array(w, name)
    if w.dtype.kind not in "fiu":
        msg = f"{name} must hold real numbers, got dtype {w.dtype}"
        raise TypeError(msg)
    if w.ndim == 0:
        msg = f"{name} must have at least 1 dimension, got a 0-d array"
        raise ValueError(msg)


def _keep_largest(scores: np.ndarray, n_prune: int) -> np.ndarray:
    """Flat keep-mask pruning the n_prune lowest scores (stable on ties)."""
    flat = scores.reshape(-1)
    keep = np.ones(flat.size, bool)
    if n_prune > 0:
        keep[np.argsort(flat, kind="stable")[:n_prune]] = False
    return keep.reshape(scores.shape)


def _score(x, norm, axis):
    if norm == "l1":
        return np.abs(x).sum(axis=axis)
    return np.sqrt(np.square(x).sum(axis=axis))


def magnitude(w, sparsity=None, *, pattern="unstructured", axis=-1, norm="l1"):
    """Keep-mask of ``w`` by weight magnitude.

    Parameters
    ----------
    w : ndarray (float or integer)
    sparsity : fraction in [0, 1) to remove; for an (n, m) pattern it may be
        None (it is 1 - n/m) and otherwise must equal 1 - n/m
    pattern : "unstructured", (n, m), ("block", r, c) or "channel"
    axis : reduction axis of an (n, m) pattern (default -1)
    norm : "l1" or "l2" block / channel score

    Returns
    -------
    bool ndarray of w's shape, True where the weight is kept.
    """
    _check_weight(w)
    if norm not in _NORMS:
        msg = f"norm must be 'l1' or 'l2', got {norm!r}"
        raise ValueError(msg)
    wf = w.astype(np.float64)
    if isinstance(pattern, tuple | list) and len(pattern) == 2:
        return _nm_mask(wf, sparsity, tuple(pattern), axis)
    s = _check_sparsity(sparsity)
    if pattern == "unstructured":
        return _keep_largest(np.abs(wf), round(s * wf.size))
    if pattern == "channel":
        rows = wf.reshape(wf.shape[0], -1)
        keep = _keep_largest(_score(rows, norm, 1), round(s * wf.shape[0]))
        return np.broadcast_to(
            keep.reshape((-1,) + (1,) * (w.ndim - 1)), w.shape
        ).copy()
    if (
        isinstance(pattern, tuple | list)
        and len(pattern) == 3
        and pattern[0] == "block"
    ):
        return _block_mask(wf, s, pattern[1], pattern[2], norm)
    msg = (
        f"pattern must be 'unstructured', (n, m), ('block', r, c) or 'channel', "
        f"got {pattern!r}"
    )
    raise ValueError(msg)


def _nm_mask(wf, sparsity, pattern, axis):
    n, m = pattern
    if not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in (n, m)
    ):
        msg = f"an N:M pattern is two ints (n, m), got {pattern!r}"
        raise TypeError(msg)
    if not 0 < n <= m:
        msg = f"an N:M pattern needs 0 < n <= m, got {pattern!r}"
        raise ValueError(msg)
    if sparsity is not None:
        s = _check_sparsity(sparsity)
        if not math.isclose(s, 1 - n / m, abs_tol=1e-9):
            msg = (
                f"pattern {pattern} removes {1 - n / m:g} of the weights, but "
                f"sparsity={sparsity!r}; pass sparsity=None or {1 - n / m:g}"
            )
            raise ValueError(msg)
    ax = v.check_axis(axis, wf.ndim)
    if wf.shape[ax] % m:
        msg = (
            f"pattern {pattern} needs w.shape[{ax}]={wf.shape[ax]} to be a "
            f"multiple of {m}; pad the weight or use pattern='unstructured'"
        )
        raise ValueError(msg)
    moved = np.moveaxis(np.abs(wf), ax, -1)
    groups = moved.reshape(-1, m)
    # the m - n smallest of each group go (stable: earlier index wins a tie)
    order = np.argsort(groups, axis=1, kind="stable")
    keep = np.ones(groups.shape, bool)
    np.put_along_axis(keep, order[:, : m - n], False, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, ax)


def _block_mask(wf, s, r, c, norm):
    if wf.ndim != 2:
        msg = f"a ('block', r, c) pattern needs a 2-D weight, got shape {wf.shape}"
        raise ValueError(msg)
    if not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) and t > 0
        for t in (r, c)
    ):
        msg = f"block sides must be positive ints, got ('block', {r!r}, {c!r})"
        raise ValueError(msg)
    M, K = wf.shape
    if M % r or K % c:
        msg = (
            f"block ({r}, {c}) does not divide w.shape {wf.shape}; pick block "
            f"sides that divide it or pad the weight"
        )
        raise ValueError(msg)
    blocks = wf.reshape(M // r, r, K // c, c)
    score = _score(blocks, norm, (1, 3))
    keep = _keep_largest(score, round(s * score.size))
    return np.repeat(np.repeat(keep, r, 0), c, 1)


def global_magnitude(
    weights, sparsity, *, min_per_layer=0.0, max_per_layer=1.0, exclude=()
):
    """Unstructured magnitude pruning ranked over several layers at once.

    Parameters
    ----------
    weights : dict name -> ndarray
    sparsity : overall fraction in [0, 1) removed from the included layers
    min_per_layer, max_per_layer : bounds on each layer's own sparsity
        (0 <= min <= max <= 1); the global threshold is moved so the total
        still matches ``sparsity`` as closely as the bounds allow
    exclude : names or fnmatch patterns of layers left dense

    Returns
    -------
    dict name -> bool keep-mask (excluded layers: all True)
    """
    if not isinstance(weights, dict):
        msg = f"weights must be a dict name -> ndarray, got {type(weights).__name__}"
        raise TypeError(msg)
    s = _check_sparsity(sparsity)
    lo, hi = float(min_per_layer), float(max_per_layer)
    if not 0.0 <= lo <= hi <= 1.0:
        msg = (
            f"need 0 <= min_per_layer <= max_per_layer <= 1, got "
            f"{min_per_layer!r}, {max_per_layer!r}"
        )
        raise ValueError(msg)
    if isinstance(exclude, str):
        exclude = (exclude,)
    names = [n for n in weights if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    for n, w in weights.items():
        _check_weight(w, f"weights[{n!r}]")
    sorted_abs = {
        n: np.sort(np.abs(weights[n].astype(np.float64)).ravel()) for n in names
    }
    sizes = {n: sorted_abs[n].size for n in names}
    total = sum(sizes.values())
    target = round(s * total)

    def counts(t):
        # per-layer prune counts at threshold t (prune |w| < t), clamped
        out = {}
        for n in names:
            k = int(np.searchsorted(sorted_abs[n], t, side="left"))
            k = min(
                max(k, math.ceil(lo * sizes[n] - 1e-9)),
                math.floor(hi * sizes[n] + 1e-9),
            )
            out[n] = k
        return out

    if names and total:
        # bisect the threshold over the merged magnitudes: prune counts grow with t
        cand = np.unique(np.concatenate([sorted_abs[n] for n in names] + [[np.inf]]))
        a, b = 0, cand.size - 1
        while a < b:
            mid = (a + b) // 2
            if sum(counts(cand[mid]).values()) >= target:
                b = mid
            else:
                a = mid + 1
        k_by = counts(cand[a])
        # ties can overshoot: every entry equal to the largest pruned value
        # (cand[a - 1]) went at once. Take the excess back from those tied
        # entries only (a layer without them keeps its smaller ones pruned),
        # layers with the most pruned first, never below min_per_layer
        excess = sum(k_by.values()) - target
        tie = cand[a - 1] if a > 0 else None
        for n in sorted(names, key=lambda n: -k_by[n]):
            if excess <= 0 or tie is None:
                break
            tied = k_by[n] - int(np.searchsorted(sorted_abs[n], tie, side="left"))
            room = min(k_by[n] - math.ceil(lo * sizes[n] - 1e-9), max(tied, 0))
            d = min(room, excess)
            k_by[n] -= d
            excess -= d
    else:
        k_by = {}
    masks = {}
    for n, w in weights.items():
        if n in k_by:
            masks[n] = _keep_largest(np.abs(w.astype(np.float64)), k_by[n])
        else:
            masks[n] = np.ones(w.shape, bool)
    return masks


# --------------------------------------------------------------------------- #
# schedules: plain functions step -> sparsity


def constant(sparsity, *, begin=0):
    """``sparsity`` from step ``begin`` on, 0 before."""
    s = _check_sparsity(sparsity)

    def schedule(step):
        return s if step >= begin else 0.0

    return schedule


def polynomial(final, *, initial=0.0, begin=0, end, frequency=1, power=3):
    """Gradual magnitude pruning (Zhu & Gupta 2017), updated every ``frequency``
    steps:  s(t) = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin))**power
    for begin <= t <= end (t rounded down to the last update step); s_i before
    ``begin``, s_f after ``end``. power=3 is the paper's cubic schedule."""
    s_f = _check_sparsity(final, "final")
    s_i = _check_sparsity(initial, "initial")
    if not (isinstance(frequency, numbers.Integral) and frequency >= 1):
        msg = f"frequency must be an int >= 1, got {frequency!r}"
        raise ValueError(msg)
    if not end > begin:
        msg = f"end must be > begin, got begin={begin!r}, end={end!r}"
        raise ValueError(msg)
    if not (isinstance(power, numbers.Real) and math.isfinite(power) and power > 0):
        msg = f"power must be a finite number > 0, got {power!r}"
        raise ValueError(msg)

    def schedule(step):
        if step < begin:
            return s_i
        t = begin + (min(step, end) - begin) // frequency * frequency
        if step >= end:
            t = end
        frac = 1.0 - (t - begin) / (end - begin)
        return s_f + (s_i - s_f) * frac**power

    return schedule


def cubic(final, *, initial=0.0, begin=0, end, frequency=1):
    """:func:`polynomial` with power 3."""
    return polynomial(final, initial=initial, begin=begin, end=end, frequency=frequency)


def linear(final, *, initial=0.0, begin=0, end, frequency=1):
    """:func:`polynomial` with power 1."""
    return polynomial(
        final, initial=initial, begin=begin, end=end, frequency=frequency, power=1
    )


# --------------------------------------------------------------------------- #


def report(masks) -> dict:
    """Per-layer and global sparsity of keep-masks.

    ``masks``: a dict name -> bool mask, or one mask. Returns
    ``{"layers": {name: {"size", "kept", "sparsity"}}, "size", "kept",
    "sparsity"}``.
    """
    if isinstance(masks, np.ndarray):
        masks = {"": masks}
    if not isinstance(masks, dict):
        msg = f"masks must be a dict name -> bool ndarray, got {type(masks).__name__}"
        raise TypeError(msg)
    layers = {}
    for n, m in masks.items():
        v.check_array(m, f"masks[{n!r}]", (np.dtype(bool),), fix="pass keep-masks")
        kept = int(np.count_nonzero(m))
        layers[n] = {
            "size": int(m.size),
            "kept": kept,
            "sparsity": 1.0 - kept / m.size if m.size else 0.0,
        }
    size = sum(x["size"] for x in layers.values())
    kept = sum(x["kept"] for x in layers.values())
    return {
        "layers": layers,
        "size": size,
        "kept": kept,
        "sparsity": 1.0 - kept / size if size else 0.0,
    }
