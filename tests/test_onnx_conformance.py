"""Conformance with the ONNX backend node tests of the quantization operators.

The onnx package carries, for every operator, small "node" test cases: a model
holding a single node, its inputs and the outputs the ONNX reference produces.
This module runs every such case of QuantizeLinear, DequantizeLinear,
DynamicQuantizeLinear, MatMulInteger and QLinearMatMul through the matching
lowprec function and requires the stored outputs *bit for bit* (same dtype, same
shape, same bit patterns), since lowprec promises ONNX-exact numerics.

Where the cases come from:

* onnx >= 1.23 no longer ships them as files; ``load_model_tests(kind="node")``
  builds them in memory by importing every generator module under
  ``onnx.backend.test.case.node``, which takes seconds. Importing only the five
  generator modules of the operators above builds the same cases in a fraction
  of that; when that private layout is missing we fall back to the public
  loader.
* onnx 1.16-1.22 ship them under ``onnx/backend/test/data/node/<case>/`` as
  ``model.onnx`` plus ``test_data_set_*/{input,output}_*.pb``.

Cases with a type lowprec does not implement (int4, uint4, int2, uint2, float8,
float4e2m1, ...) are collected with a skip mark whose reason names the type, so
``pytest -rs`` lists each of them. Every skip decision is taken here, at
collection; the tests themselves never skip, so the number of supported cases
counted by ``test_enough_cases_are_supported`` is the number that run. The
``_expanded`` cases (function bodies with many nodes) are left out: they test
the ONNX function expansion, not the operator.

``test_reference_evaluator_agrees`` checks the harness: onnx's own
``ReferenceEvaluator`` must reproduce the stored outputs from the inputs as this
module feeds them.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import importlib
import os
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lowprec  # noqa: E402

OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
)

_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16
_U8, _I8, _U16, _I16 = (
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.UINT16,
    TensorProto.INT16,
)
_I32 = TensorProto.INT32

# Element types lowprec implements, per operator (inputs and outputs alike).
SUPPORTED_TYPES = {
    "QuantizeLinear": {_F32, _F16, _U8, _I8, _U16, _I16},
    "DequantizeLinear": {_F32, _F16, _U8, _I8, _U16, _I16, _I32},
    "DynamicQuantizeLinear": {_F32, _U8},
    "MatMulInteger": {_U8, _I8, _I32},
    "QLinearMatMul": {_F32, _F16, _U8, _I8},
}

# Cases every onnx release since 1.16 has per operator, all of supported types:
# plain and per-axis (De)QuantizeLinear, the three DynamicQuantizeLinear cases,
# MatMulInteger, and 2-D / 3-D QLinearMatMul.
MIN_SUPPORTED = {
    "QuantizeLinear": 2,
    "DequantizeLinear": 2,
    "DynamicQuantizeLinear": 3,
    "MatMulInteger": 1,
    "QLinearMatMul": 2,
}
# onnx 1.23.2 has 23 supported cases: QuantizeLinear 6 (plain, axis, uint16,
# int16, blocked_asymmetric, blocked_symmetric), DequantizeLinear 5 (plain,
# axis, uint16, int16, blocked), DynamicQuantizeLinear 3, MatMulInteger 1,
# QLinearMatMul 8 (2-D/3-D x uint8/int8 x float32/float16).
MIN_SUPPORTED_TOTAL_ONNX_1_23 = 20


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


@dataclasses.dataclass
class Case:
    """One node test case: the model, where its data comes from, and whether
    (and why not) lowprec runs it."""

    name: str
    model: onnx.ModelProto
    raw_data_sets: list | None = None  # in memory: [(inputs, outputs)]
    case_dir: str | None = None  # on disk: test_data_set_* folders
    skip_reason: str | None = None

    @property
    def node(self) -> onnx.NodeProto:
        return self.model.graph.node[0]

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def data_sets(self) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
        """The (inputs, outputs) pairs as numpy arrays, inputs in the order of
        the node's present (non-empty) inputs."""
        if self.raw_data_sets is not None:
            return [
                ([_to_numpy(v) for v in ins], [_to_numpy(v) for v in outs])
                for ins, outs in self.raw_data_sets
            ]
        sets = []
        pattern = os.path.join(self.case_dir, "test_data_set_*")
        for set_dir in sorted(glob.glob(pattern), key=_numeric_suffix):
            sets.append(
                (_read_tensors(set_dir, "input"), _read_tensors(set_dir, "output"))
            )
        return sets


def _numeric_suffix(path: str) -> int:
    match = re.search(r"(\d+)(?:\.pb)?$", path)
    return int(match.group(1)) if match else -1


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def _read_tensors(set_dir: str, kind: str) -> list[np.ndarray]:
    paths = glob.glob(os.path.join(set_dir, f"{kind}_*.pb"))
    tensors = []
    for path in sorted(paths, key=_numeric_suffix):
        tensor = TensorProto()
        with open(path, "rb") as f:
            tensor.ParseFromString(f.read())
        tensors.append(numpy_helper.to_array(tensor))
    return tensors


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _skip_reason(model: onnx.ModelProto) -> str | None:
    """Why lowprec cannot run this case, or None when it can."""
    node = model.graph.node[0]
    op = node.op_type
    graph = model.graph
    unsupported = collections.defaultdict(list)  # type name -> value names
    for vi in [*graph.input, *graph.output]:
        elem_type = vi.type.tensor_type.elem_type
        if elem_type not in SUPPORTED_TYPES[op]:
            unsupported[_type_name(elem_type)].append(vi.name)
    if unsupported:
        return "; ".join(
            f"{op} with {type_name} ({', '.join(names)}): not implemented in lowprec"
            for type_name, names in unsupported.items()
        )
    attrs = _attributes(node)
    output_dtype = attrs.get("output_dtype", 0)
    if op == "QuantizeLinear" and output_dtype not in (0, _U8, _I8, _U16, _I16):
        return (
            f"QuantizeLinear output_dtype={_type_name(output_dtype)}, "
            f"which lowprec does not implement"
        )
    if op == "DequantizeLinear" and output_dtype != 0:
        scale_type = graph.input[1].type.tensor_type.elem_type
        if output_dtype != scale_type:
            return (
                f"DequantizeLinear output_dtype={_type_name(output_dtype)} differs "
                f"from the scale type; lowprec returns the scale type"
            )
    if attrs.get("precision", 0) != 0:
        return (
            f"QuantizeLinear precision={_type_name(attrs['precision'])}: lowprec "
            f"divides in the promoted type of x and y_scale"
        )
    return None


def _single_node_op(model: onnx.ModelProto) -> str | None:
    nodes = model.graph.node
    if len(nodes) == 1 and nodes[0].domain in ("", "ai.onnx"):
        if nodes[0].op_type in OPS:
            return nodes[0].op_type
    return None


def _onnx_node_dir() -> str:
    return os.path.join(
        os.path.dirname(onnx.__file__), "backend", "test", "data", "node"
    )


def _disk_cases(node_dir: str) -> list[Case]:
    """onnx <= 1.22: one folder per case with model.onnx and data sets."""
    prefixes = tuple(f"test_{op.lower()}" for op in OPS)
    cases = []
    for name in sorted(os.listdir(node_dir)):
        case_dir = os.path.join(node_dir, name)
        model_path = os.path.join(case_dir, "model.onnx")
        if not name.startswith(prefixes) or not os.path.isfile(model_path):
            continue
        model = onnx.load(model_path)
        if _single_node_op(model):
            cases.append(Case(name, model, case_dir=case_dir))
    return cases


def _memory_test_cases() -> list:
    """onnx >= 1.23: the TestCase objects, built by the generator modules."""
    try:
        node_pkg = importlib.import_module("onnx.backend.test.case.node")
        for op in OPS:
            importlib.import_module(f"onnx.backend.test.case.node.{op.lower()}")
        built = list(node_pkg._NodeTestCases)
    except (ImportError, AttributeError):
        built = []
    if {_single_node_op(c.model) for c in built if c.model is not None} >= set(OPS):
        return built
    from onnx.backend.test.loader import load_model_tests

    return load_model_tests(kind="node")


def _load_cases() -> list[Case]:
    node_dir = _onnx_node_dir()
    if os.path.isdir(node_dir):
        cases = _disk_cases(node_dir)
    else:
        cases, seen = [], set()
        for tc in _memory_test_cases():
            if tc.model is None or tc.name in seen or not _single_node_op(tc.model):
                continue
            seen.add(tc.name)
            cases.append(Case(tc.name, tc.model, raw_data_sets=tc.data_sets))
    for case in cases:
        case.skip_reason = _skip_reason(case.model)
    return sorted(cases, key=lambda c: (OPS.index(c.op_type), c.name))


CASES = _load_cases()


def _params(cases: list[Case]) -> list:
    return [
        pytest.param(
            case,
            id=case.name,
            marks=[pytest.mark.skip(reason=f"{case.name}: {case.skip_reason}")]
            if case.skip_reason
            else [],
        )
        for case in cases
    ]


# ---------------------------------------------------------------------------
# Running a case through lowprec


def _node_args(node: onnx.NodeProto, inputs: list[np.ndarray]) -> list:
    """The node's inputs by position; None for an absent optional input (an
    empty name, or missing at the end)."""
    present = iter(inputs)
    return [next(present) if name else None for name in node.input]


def _pad(args: list, n: int) -> list:
    return args + [None] * (n - len(args))


def run_lowprec(node: onnx.NodeProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Evaluate one ONNX node with lowprec; returns its outputs in order."""
    op = node.op_type
    attrs = _attributes(node)
    args = _node_args(node, inputs)
    if op == "QuantizeLinear":
        x, scale, zero_point = _pad(args, 3)
        y = lowprec.quantize_linear(
            x,
            scale,
            zero_point,
            axis=attrs.get("axis", 1),
            block_size=attrs.get("block_size", 0),
            saturate=bool(attrs.get("saturate", 1)),
            output_dtype=attrs.get("output_dtype"),  # the ONNX type code
        )
        return [y]
    if op == "DequantizeLinear":
        x, scale, zero_point = _pad(args, 3)
        y = lowprec.dequantize_linear(
            x,
            scale,
            zero_point,
            axis=attrs.get("axis", 1),
            block_size=attrs.get("block_size", 0),
        )
        return [y]
    if op == "DynamicQuantizeLinear":
        return list(lowprec.dynamic_quantize_linear(args[0]))
    if op == "MatMulInteger":
        a, b, a_zero_point, b_zero_point = _pad(args, 4)
        return [lowprec.matmul_integer(a, b, a_zero_point, b_zero_point)]
    if op == "QLinearMatMul":
        return [lowprec.qlinear_matmul(*_pad(args, 8))]
    raise AssertionError(f"no lowprec mapping for {op}")


def assert_bit_exact(got, expected, what: str) -> None:
    """Same dtype, same shape and the same bit pattern in every element (so
    float -0.0 differs from 0.0 and NaN payloads count)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, (
        f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    )
    assert got.shape == expected.shape, (
        f"{what}: shape {got.shape}, expected {expected.shape}"
    )
    bits = np.dtype(f"u{expected.dtype.itemsize}")
    got_bits = np.ascontiguousarray(got).view(bits)
    expected_bits = np.ascontiguousarray(expected).view(bits)
    if not np.array_equal(got_bits, expected_bits):
        wrong = np.argwhere(got_bits != expected_bits)
        lines = [
            f"  at {tuple(int(i) for i in idx)}: got {got[tuple(idx)]!r}, "
            f"expected {expected[tuple(idx)]!r}"
            for idx in wrong[:10]
        ]
        raise AssertionError(
            f"{what}: {len(wrong)} of {expected.size} elements differ\n"
            + "\n".join(lines)
            + f"\ngot:\n{got!r}\nexpected:\n{expected!r}"
        )


# ---------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", _params(CASES))
def test_node_case_bit_exact(case: Case):
    """lowprec reproduces the stored outputs of the ONNX node test bit for bit."""
    node = case.node
    data_sets = case.data_sets()
    assert data_sets, f"{case.name} has no data set"
    for i, (inputs, expected) in enumerate(data_sets):
        got = run_lowprec(node, inputs)
        assert len(got) == len(expected), (
            f"{case.name}: {len(got)} outputs, expected {len(expected)}"
        )
        for name, g, e in zip(node.output, got, expected, strict=True):
            assert_bit_exact(g, e, f"{case.name} data set {i} output {name!r}")


@pytest.mark.parametrize("case", _params(CASES))
def test_reference_evaluator_agrees(case: Case):
    """Harness check: onnx's ReferenceEvaluator, fed the inputs as this module
    maps them, yields the stored outputs."""
    from onnx.reference import ReferenceEvaluator

    node = case.node
    evaluator = ReferenceEvaluator(case.model)
    present = [name for name in node.input if name]
    for i, (inputs, expected) in enumerate(case.data_sets()):
        got = evaluator.run(None, dict(zip(present, inputs, strict=True)))
        for name, g, e in zip(node.output, got, expected, strict=True):
            assert_bit_exact(g, e, f"{case.name} data set {i} reference {name!r}")


def test_enough_cases_are_supported():
    """The loader found the operators' cases and most are run, so the suite
    cannot pass by skipping everything. Prints what runs and what is skipped
    (visible with ``pytest -s``; ``-rs`` lists the skips too)."""
    run = [c for c in CASES if c.skip_reason is None]
    skipped = [c for c in CASES if c.skip_reason is not None]
    print(f"\nonnx {onnx.__version__}: {len(run)} cases run, {len(skipped)} skipped")
    for c in run:
        print(f"  run   {c.name}")
    for c in skipped:
        print(f"  skip  {c.name}: {c.skip_reason}")

    counts = collections.Counter(c.op_type for c in run)
    for op, minimum in MIN_SUPPORTED.items():
        assert counts[op] >= minimum, (
            f"only {counts[op]} supported {op} cases found (expected >= {minimum})"
        )
    version = tuple(int(p) for p in re.findall(r"\d+", onnx.__version__)[:2])
    if version >= (1, 23):
        assert len(run) >= MIN_SUPPORTED_TOTAL_ONNX_1_23, (
            f"only {len(run)} supported cases with onnx {onnx.__version__}"
        )
