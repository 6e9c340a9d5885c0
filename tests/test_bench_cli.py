"""The `lowprec bench` command, its JSON, and bench/make_readme_table.py."""

import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys

import pytest

from lowprec import bench as lb
from lowprec import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE_SCRIPT = ROOT / "bench" / "make_readme_table.py"

ROW_KEYS = {
    "suite",
    "op",
    "shape",
    "M",
    "K",
    "N",
    "variant",
    "threads",
    "ops",
    "group",
    "lowprec",
    "baselines",
    "best_baseline",
    "best_baseline_gops",
    "ratio",
    "peak_gops",
    "pct_peak",
}
TIMING_KEYS = {
    "gops",
    "gops_min",
    "gops_max",
    "median_s",
    "samples_s",
    "calls_per_sample",
}
TOP_KEYS = {
    "schema",
    "suite",
    "date",
    "command",
    "machine",
    "versions",
    "blas",
    "lowprec",
    "env",
    "settings",
    "peak_gops",
    "peak_note",
    "baselines",
    "warnings",
    "rows",
}


def _load_table_module(path=TABLE_SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_results(res, shapes, variants, threads):
    assert TOP_KEYS <= res.keys()
    got = [(r["shape"], r["variant"], r["threads"]) for r in res["rows"]]
    want = [(s, v, t) for s in shapes for v in variants for t in threads]
    assert got == want
    for r in res["rows"]:
        assert ROW_KEYS <= r.keys(), ROW_KEYS - r.keys()
        assert TIMING_KEYS <= r["lowprec"].keys()
        assert r["lowprec"]["gops"] > 0
        assert (
            r["lowprec"]["gops_min"] <= r["lowprec"]["gops"] <= r["lowprec"]["gops_max"]
        )
        assert r["ops"] == 2 * r["M"] * r["K"] * r["N"]
        for name, b in r["baselines"].items():
            assert name in lb.BASELINE_BY_NAME
            assert "gops" in b or "skipped" in b
        counted = {
            n: b["gops"]
            for n, b in r["baselines"].items()
            if b["counts"] and "gops" in b
        }
        if counted:
            assert r["best_baseline"] == max(counted, key=counted.get)
            assert r["ratio"] == pytest.approx(
                r["lowprec"]["gops"] / max(counted.values())
            )
        else:
            assert r["ratio"] is None
        # the free sanity check against onnxruntime: same integers
        if r.get("check", {}).get("vs") == "ort_mmint":
            assert r["check"]["mismatches"] == 0
    assert res["lowprec"]["isa"] in res["lowprec"]["available_isas"]
    assert set(res["peak_gops"]) == {str(t) for t in threads}


def test_bench_quick_json_and_readme_table(tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cli.main(
        [
            "bench",
            "--quick",
            "--threads",
            "1",
            "--repeat",
            "1",
            "--min-time",
            "0.001",
            "--settle",
            "0",
            "--retries",
            "0",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    shapes = ["x".join(map(str, s)) for s in lb.QUICK_SHAPES]
    _check_results(res, shapes, list(lb.DEFAULT_VARIANTS), [1])
    assert res["command"].startswith("lowprec bench --quick")
    printed = capsys.readouterr().out
    assert "lowprec" in printed
    assert shapes[0] in printed

    mod = _load_table_module()
    md = mod.render(res)
    table_lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(table_lines) == len(res["rows"]) + 1  # header + rows
    for s in shapes:
        assert s.replace("x", "×") in md
    assert res["command"] in md
    for r in res["rows"]:
        if r["ratio"] is not None and r["ratio"] < 1:
            assert "**loses**" in md

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{mod.START}\nold table\n{mod.END}\noutro\n")
    proc = subprocess.run(
        [sys.executable, str(TABLE_SCRIPT), str(out), "--write", str(readme)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("intro\n")
    assert text.endswith(f"{mod.END}\noutro\n")
    assert "| Shape" in text

    # bench/merge_runs.py pools the samples of several runs
    merge = _load_table_module(ROOT / "bench" / "merge_runs.py")
    slow = json.loads(out.read_text())
    for r in slow["rows"]:
        r["lowprec"]["samples_s"] = [2 * t for t in r["lowprec"]["samples_s"]]
    merged = merge.merge([res, slow])
    _check_results(merged, shapes, list(lb.DEFAULT_VARIANTS), [1])
    for r0, r in zip(res["rows"], merged["rows"], strict=True):
        pooled = r0["lowprec"]["samples_s"] + [
            2 * t for t in r0["lowprec"]["samples_s"]
        ]
        assert r["lowprec"]["median_s"] == statistics.median(pooled)
        assert r["merged_runs"] == 2
        assert r["pct_peak"] == pytest.approx(
            100 * r["lowprec"]["gops"] / merged["peak_gops"]["1"]
        )
    assert merged["settings"]["repeat"] == 2 * res["settings"]["repeat"]
    assert "samples pooled" in mod.render(merged)
    # rounds: named in the table where every run took turns (this run has
    # rounds 1: one block each, no rounds named); a run from before --rounds
    # leaves them out of the merge
    assert res["settings"]["rounds"] == 1
    assert "rounds taking turns" not in mod.render(res)
    turns = json.loads(out.read_text())
    turns["settings"]["rounds"] = 3
    assert "in 3 rounds taking turns" in mod.render(turns)
    assert "in 4 rounds taking turns" in mod.render(merge.merge([res, turns]))
    del slow["settings"]["rounds"]
    assert "rounds" not in merge.merge([turns, slow])["settings"]
    # a row that carries its own peak (the half suite's FMA / vdpbf16ps rate)
    # keeps it, the best of the runs, instead of the suite's vpdpbusd peak
    for run, p in ((res, 100.0), (slow, 120.0)):
        run["rows"][0]["peak_kind"] = "vfmadd231ps"
        run["rows"][0]["peak_gops"] = p
    own = merge.merge([res, slow])["rows"][0]
    assert own["peak_gops"] == 120.0
    assert own["pct_peak"] == pytest.approx(100 * own["lowprec"]["gops"] / 120.0)


def test_bench_without_optional_libraries(tmp_path, monkeypatch):
    # Baselines, threadpoolctl, tqdm and the peak probe are all optional: with
    # none importable the run still works and says what was missing.
    for mod in (
        "onnxruntime",
        "onnx",
        "torch",
        "threadpoolctl",
        "tqdm",
        "lowprec.kernels.int8_gemm_vnni",
    ):
        monkeypatch.setitem(sys.modules, mod, None)  # import -> ImportError
    out = tmp_path / "res.json"
    cli.main(
        [
            "bench",
            "--shapes",
            "17x40x24",
            "--variants",
            "u8s8->i32,u8s8->u8 qlinear",
            "--threads",
            "1",
            "--repeat",
            "2",
            "--min-time",
            "0.001",
            "--settle",
            "0",
            "--retries",
            "0",
            "--json",
            str(out),
        ]
    )
    res = json.loads(out.read_text())
    _check_results(res, ["17x40x24"], ["u8s8->i32", "u8s8->u8 qlinear"], [1])
    assert set(res["baselines"]["unavailable"]) == {
        "ort_mmint",
        "ort_mmint_exact",
        "ort_qlmm",
        "ort_dynqmm",
        "torch_int_mm",
        "torch_dyn",
    }
    assert all(set(r["baselines"]) == {"numpy_f32"} for r in res["rows"])
    assert res["peak_gops"] == {"1": None}
    assert res["blas"] == "threadpoolctl not installed"
    assert "n/a" in _load_table_module().render(res)


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "bench" in capsys.readouterr().out
    for bad in (
        ["bench", "--shapes", "12x34"],
        ["bench", "--threads", "0"],
        [],
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(bad)
        assert e.value.code == 2
    # names are checked against the chosen suite, with the choices in the message
    with pytest.raises(SystemExit, match=r"unknown variant\(s\) \['f16'\]"):
        cli.main(["bench", "--variants", "f16", "--threads", "1"])
    with pytest.raises(SystemExit, match=r"not baselines of suite int8_gemm"):
        cli.main(["bench", "--baselines", "mkl", "--threads", "1"])
    with pytest.raises(SystemExit, match=r"--rounds must be >= 1"):
        cli.main(["bench", "--rounds", "0", "--threads", "1"])


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "res.json", tmp_path / "res.png"
    cli.main(
        [
            "bench",
            "--shapes",
            "8x16x16",
            "--variants",
            "s8s8->i32",
            "--threads",
            "1",
            "--repeat",
            "1",
            "--min-time",
            "0.001",
            "--settle",
            "0",
            "--retries",
            "0",
            "--baselines",
            "numpy_f32",
            "--no-progress",
            "--json",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_machine_is_retried_and_flagged(tmp_path, monkeypatch, capsys):
    # Pretend someone else holds a core throughout: every case is retried, the
    # rows and the printed table say so, and the run still completes.
    monkeypatch.setattr(lb.OtherLoad, "cores", lambda self: 1.0)
    monkeypatch.setattr(lb, "RETRY_PAUSE_S", 0.0)
    out = tmp_path / "res.json"
    cli.main(
        ["bench", "--shapes", "4x8x8", "--variants", "u8s8->i32", "--threads", "1",
         "--repeat", "1", "--min-time", "0", "--settle", "0", "--retries", "2",
         "--baselines", "none", "--no-progress", "--json", str(out)]
    )  # fmt: skip
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["attempts"] == 3
    assert row["other_load_cores"] == 1.0
    assert any("other processes used" in w for w in res["warnings"])
    assert "1.00!" in capsys.readouterr().out
    assert "unreliable" in _load_table_module().render(res)


def test_sparse_sweep_plot(tmp_path):
    """The sparse sweep's speedup-vs-sparsity chart: one panel per (shape, N)."""
    pytest.importorskip("matplotlib")
    from lowprec import _bench_sparse

    rows = [
        {"M": 64, "K": 64, "N": n, "variant": v, "sparsity": s,
         "speedup_vs_numpy_f32": 0.5 + 4 * s}
        for n in (1, 32)
        for v in ("fp32 csr", "int8 bsr1x4")
        for s in (0.5, 0.9)
    ]  # fmt: skip
    png = tmp_path / "sparse.png"
    _bench_sparse.plot(rows, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_rounds_take_turns(monkeypatch):
    # rounds: each implementation's samples are spread over the rounds, the
    # order rotated a round, every block after its own warm-up call
    monkeypatch.setattr(lb, "sample", lambda fn, n: (fn(), 1.0)[1])
    calls = []
    impls = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    t = lb.measure(impls, repeat=5, min_time=1e9, settle=0, rounds=3)
    assert [len(t[n].samples_s) for n in "abc"] == [5, 5, 5]
    # calls: per block a warm-up (+ the calibration call in round 0) + samples
    blocks = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # one block each without rounds; rounds past repeat are capped
    calls.clear()
    lb.measure(impls, repeat=2, min_time=1e9, settle=0, rounds=9)
    blocks = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    assert blocks == ["a", "b", "c", "b", "c", "a"]
    calls.clear()
    lb.measure(impls, repeat=2, min_time=1e9, settle=0)
    assert calls == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
