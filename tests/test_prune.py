"""lowprec.prune: masks checked against their definitions (counts, ranks)."""

import numpy as np
import pytest

from lowprec import prune


def test_unstructured_prunes_the_smallest():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    for s in (0.0, 0.25, 0.5, 0.9, 0.999):
        m = prune.magnitude(w, s)
        assert m.dtype == bool
        assert m.shape == w.shape
        assert (~m).sum() == round(s * w.size)
        if 0 < s:
            assert np.abs(w[m]).min(initial=np.inf) >= np.abs(w[~m]).max()


def test_unstructured_ties_are_deterministic():
    w = np.ones((4, 4), np.float32)
    m = prune.magnitude(w, 0.5)
    assert (~m).sum() == 8
    assert np.array_equal(m, prune.magnitude(w.copy(), 0.5))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_n_m_along_reduction_axis(n, m):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 16))
    mask = prune.magnitude(w, pattern=(n, m))
    g = mask.reshape(6, -1, m)
    assert np.all(g.sum(-1) == n)
    # the kept ones are the n largest of every group
    a = np.abs(w).reshape(6, -1, m)
    kept_min = np.where(g, a, np.inf).min(-1)
    dropped_max = np.where(g, -np.inf, a).max(-1)
    assert np.all(kept_min >= dropped_max)
    assert np.array_equal(prune.magnitude(w, 1 - n / m, pattern=(n, m)), mask)
    m0 = prune.magnitude(w.T, pattern=(n, m), axis=0)
    assert np.array_equal(m0, mask.T)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_blocks(norm):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 12))
    mask = prune.magnitude(w, 0.5, pattern=("block", 2, 3), norm=norm)
    b = mask.reshape(4, 2, 4, 3)
    assert np.all(b.all(axis=(1, 3)) == b.any(axis=(1, 3)))  # whole blocks
    assert (~b.all(axis=(1, 3))).sum() == 8
    blocks = w.reshape(4, 2, 4, 3)
    score = (
        np.abs(blocks).sum((1, 3)) if norm == "l1" else np.sqrt((blocks**2).sum((1, 3)))
    )
    kept = b.all(axis=(1, 3))
    assert score[kept].min() >= score[~kept].max()


def test_channel():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((10, 3, 3))
    mask = prune.magnitude(w, 0.3, pattern="channel")
    rows = mask.reshape(10, -1)
    assert np.all(rows.all(1) == rows.any(1))
    assert (~rows.all(1)).sum() == 3
    norms = np.abs(w).reshape(10, -1).sum(1)
    assert norms[rows.all(1)].min() >= norms[~rows.all(1)].max()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range(bad):
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune.magnitude(np.ones((4, 4)), bad)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune.global_magnitude({"a": np.ones(4)}, bad)


def test_bad_patterns():
    w = np.ones((6, 10))
    with pytest.raises(ValueError, match="multiple of 4"):
        prune.magnitude(w, pattern=(2, 4))
    with pytest.raises(ValueError, match="does not divide"):
        prune.magnitude(w, 0.5, pattern=("block", 4, 1))
    with pytest.raises(ValueError, match="sparsity=0.3"):
        prune.magnitude(np.ones((4, 8)), 0.3, pattern=(2, 4))
    with pytest.raises(ValueError, match="pattern must be"):
        prune.magnitude(w, 0.5, pattern="rows")
    with pytest.raises(ValueError, match="norm"):
        prune.magnitude(w, 0.5, pattern="channel", norm="l3")
    with pytest.raises(TypeError, match="numpy.ndarray"):
        prune.magnitude([[1.0]], 0.5)


def test_global_magnitude():
    rng = np.random.default_rng(4)
    ws = {
        "big": rng.standard_normal((32, 32)) * 10,
        "small": rng.standard_normal((16, 16)),
        "head": rng.standard_normal((8, 8)),
    }
    masks = prune.global_magnitude(ws, 0.6, exclude=["hea*"])
    rep = prune.report(masks)
    assert rep["layers"]["head"]["sparsity"] == 0
    pruned = sum((~masks[n]).sum() for n in ("big", "small"))
    assert pruned == round(0.6 * (32 * 32 + 16 * 16))
    # one global threshold: every kept weight >= every pruned one
    kept = np.concatenate([np.abs(ws[n])[masks[n]] for n in ("big", "small")])
    gone = np.concatenate([np.abs(ws[n])[~masks[n]] for n in ("big", "small")])
    assert kept.min() >= gone.max()
    assert rep["layers"]["small"]["sparsity"] > 0.9  # the small layer goes first
    capped = prune.global_magnitude(ws, 0.6, max_per_layer=0.7, exclude="head")
    r2 = prune.report({n: capped[n] for n in ("big", "small")})
    assert r2["layers"]["small"]["sparsity"] <= 0.7 + 1e-9
    assert abs(r2["sparsity"] - 0.6) < 1e-3
    floor = prune.global_magnitude(ws, 0.1, min_per_layer=0.2)
    assert all(prune.report(floor)["layers"][n]["sparsity"] >= 0.2 - 1e-9 for n in ws)
    with pytest.raises(ValueError, match="min_per_layer"):
        prune.global_magnitude(ws, 0.5, min_per_layer=0.8, max_per_layer=0.5)


def test_global_magnitude_ties_take_back_only_tied():
    # the threshold's ties overshoot the target (two .5s for one place): the
    # excess comes back from the tied entries, not from a layer without ties
    # (which un-pruned its .4 and kept it over a pruned .5)
    ws = {
        "a": np.array([0.1, 0.2, 0.3, 0.4] + [0.9] * 6),
        "b": np.array([0.5, 0.5]),
    }
    masks = prune.global_magnitude(ws, 5 / 12)
    kept = np.concatenate([np.abs(ws[n])[masks[n]] for n in ws])
    gone = np.concatenate([np.abs(ws[n])[~masks[n]] for n in ws])
    assert gone.size == 5
    assert kept.min() >= gone.max()
    np.testing.assert_array_equal(np.sort(gone), [0.1, 0.2, 0.3, 0.4, 0.5])


def test_schedules():
    c = prune.constant(0.5, begin=10)
    assert c(0) == 0
    assert c(10) == 0.5
    assert c(1000) == 0.5
    p = prune.polynomial(0.8, begin=100, end=200, frequency=10)
    assert p(0) == 0
    assert p(100) == 0
    assert p(200) == 0.8
    assert p(10_000) == 0.8
    assert p(155) == p(150) == pytest.approx(0.8 - 0.8 * 0.5**3)
    vals = [p(t) for t in range(0, 300, 5)]
    assert all(a <= b for a, b in zip(vals, vals[1:], strict=False))
    lin = prune.linear(0.9, initial=0.1, begin=0, end=100)
    assert lin(50) == pytest.approx(0.5)
    assert lin(0) == pytest.approx(0.1)
    assert prune.cubic(0.8, begin=100, end=200, frequency=10)(155) == p(155)
    with pytest.raises(ValueError, match="end must be > begin"):
        prune.polynomial(0.5, begin=5, end=5)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune.polynomial(1.0, end=5)
    with pytest.raises(ValueError, match="power must be a finite number > 0"):
        prune.polynomial(0.5, end=5, power=float("nan"))
    with pytest.raises(ValueError, match="block sides must be positive ints"):
        prune.magnitude(np.ones((4, 4)), 0.5, pattern=("block", True, 1))


def test_report():
    m = {"a": np.array([True, False, False, True]), "b": np.ones((2, 2), bool)}
    r = prune.report(m)
    assert r["layers"]["a"] == {"size": 4, "kept": 2, "sparsity": 0.5}
    assert r["sparsity"] == 0.25
    assert r["size"] == 8
    assert r["kept"] == 6
    assert prune.report(np.zeros(3, bool))["sparsity"] == 1.0
