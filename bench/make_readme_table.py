"""Turn `lowprec bench --json PATH` (or `lowprec demo --json PATH`) results into
the README's markdown tables.

    python bench/make_readme_table.py bench-results.json              # print it
    python bench/make_readme_table.py bench-results.json --write README.md

``--write`` replaces what lies between the lines ``<!-- bench-table:start -->``
and ``<!-- bench-table:end -->`` (int8_gemm results; ``<suite>-table`` for the
other suites, e.g. ``int8_conv-table``; ``demo-table`` for demo results;
markers kept) and leaves the rest untouched.
Only the standard library is used, so it runs anywhere the JSON is.
"""

from __future__ import annotations

import argparse
import json
import sys

START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"

# Column headers for the baselines lowprec.bench knows; unknown names pass through.
BASELINE_HEADERS = {
    "numpy_f32": "numpy f32 ¹",
    "ort_mmint": "ORT MatMulInteger",
    "ort_mmint_exact": "ORT MatMulInteger exact",
    "ort_qlmm": "ORT QLinearMatMul",
    "torch_int_mm": "torch._int_mm",
    "torch_dyn": "torch dyn. Linear",
    "ort_dynqmm": "ORT DynamicQuantizeMatMul",
    "ort_qlconv": "ORT QLinearConv",
    "ort_qlconv_exact": "ORT QLinearConv exact",
    "ort_convint": "ORT ConvInteger",
    "ort_conv_f32": "ORT Conv f32",
    "torch_onednn": "torch qconv onednn",
    "torch_fbgemm": "torch qconv fbgemm",
    "torch_bf16": "torch bf16",
    "torch_f16": "torch f16",
    "numpy_f16": "numpy f16",
}


def _gops(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _baseline_names(rows) -> list[str]:
    seen = {n for r in rows for n in r.get("baselines", {})}
    known = [n for n in BASELINE_HEADERS if n in seen]
    return known + sorted(seen - set(known))


def _cell(b) -> str:
    if b is None:
        return "–"
    if "gops" in b:
        return _gops(b["gops"])
    return "skipped"


def render_table(res: dict) -> str:
    rows = res["rows"]
    names = _baseline_names(rows)
    header = ["Shape M×K×N", "Variant", "Threads", "lowprec GOP/s", "% of peak"]
    header += [BASELINE_HEADERS.get(n, n) for n in names]
    header += ["lowprec / best baseline ²"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|"
        + "|".join(["---", "---", "--:", "--:", "--:"] + ["--:"] * len(names) + ["--:"])
        + "|",
    ]
    for r in rows:
        pct = r.get("pct_peak")
        cells = [
            r["shape"].replace("x", "×"),
            f"`{r['variant']}`",
            str(r["threads"]),
            _gops(r["lowprec"]["gops"]),
            "n/a" if pct is None else f"{pct:.0f} %",
        ]
        cells += [_cell(r["baselines"].get(n)) for n in names]
        ratio = r.get("ratio")
        if ratio is None:
            cells.append("–")
        else:
            best = BASELINE_HEADERS.get(r["best_baseline"], r["best_baseline"])
            txt = f"{ratio:.2f}× vs {best}"
            cells.append(f"{txt} **loses**" if ratio < 1 else txt)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _blas_text(blas) -> str:
    if isinstance(blas, str):
        return blas
    if not blas:
        return "none found by threadpoolctl"
    used = [b for b in blas if b.get("numpy_uses")]
    parts = []
    for b in used or blas:
        arch = b.get("architecture") or "?"
        parts.append(f"{b.get('internal_api')} {b.get('version')} ({arch})")
    return ", ".join(parts)


def render_footnotes(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    feats = ", ".join(k for k, on in m.get("llvm_features", {}).items() if on)
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "lowprec")
    peaks = res.get("peak_gops", {})
    peak_txt = ", ".join(
        f"{t} thread{'s' if t != '1' else ''}: {_gops(p)} GOP/s"
        for t, p in peaks.items()
    )
    env = {k: val for k, val in res.get("env", {}).items() if val}
    env_txt = " ".join(f"{k}={val}" for k, val in env.items())
    # rows that carry their own peak (the half suite: FMA / vdpbf16ps)
    kinds = {}
    for r in res.get("rows", []):
        if r.get("peak_kind") and r.get("peak_gops"):
            key = (r["peak_kind"], str(r["threads"]))
            kinds[key] = max(kinds.get(key, 0.0), r["peak_gops"])
    if kinds:
        peak_def = "the row's own measured instruction throughput"
        peak_txt = ", ".join(
            f"{k} {t} thread{'s' if t != '1' else ''}: {_gops(p)} GOP/s"
            for (k, t), p in kinds.items()
        )
    else:
        peak_def = res.get("peak_note", "measured vpdpbusd throughput").split(" (")[0]
    against = res["baselines"].get("ratio_against") or []
    cores = m.get("cpus_usable", m.get("cpu_count"))
    out = [
        "¹ numpy float32 matmul of the same shape, for context; not counted as a "
        "baseline.",
        "² lowprec GOP/s over the fastest counted baseline of that row ("
        + ", ".join(BASELINE_HEADERS.get(n, n) for n in against)
        + "); **loses** where lowprec is slower.",
        "",
        f"- GOP/s = 2·M·N·K / median time ({res['settings']['repeat']} samples, "
        f"each ≥ {res['settings']['min_time_s']} s of calls after a warm-up call"
        + (
            f", in {rounds} rounds taking turns with the baselines"
            if (rounds := res["settings"].get("rounds", 1)) > 1
            else ""
        )
        + "); "
        f"% of peak = lowprec GOP/s / {peak_def} "
        f"({peak_txt or 'n/a'}).",
        f"- Hardware: {m.get('cpu_model')} (LLVM: {m.get('llvm_host_cpu')}; "
        f"{feats or 'no SIMD features reported'}), {cores} cores usable; "
        f"lowprec path `{_path(res)}`.",
        f"- Versions: lowprec {res['lowprec'].get('version')}, {vers}.",
        f"- numpy BLAS: {_blas_text(res.get('blas'))}.",
        f"- Command: `{(env_txt + ' ') if env_txt else ''}{res['command']}`, "
        f"{res['date']}.",
    ]
    unavailable = res["baselines"].get("unavailable") or {}
    if unavailable:
        out.append("- Not installed, so not run: " + ", ".join(unavailable) + ".")
    busy = [r for r in res["rows"] if (r.get("other_load_cores") or 0) >= 0.25]
    if busy:
        out.append(
            f"- {len(busy)} of {len(res['rows'])} rows ran while other processes "
            f"used ≥ 0.25 cores (up to {max(r['other_load_cores'] for r in busy)}); "
            f"treat them, 2-thread rows most, as unreliable."
        )
    for w in res.get("warnings", []):
        out.append(f"- Warning at run time: {w}")
    return "\n".join(out)


def render(res: dict) -> str:
    return render_table(res) + "\n\n" + render_footnotes(res) + "\n"


def render_demo(res: dict) -> str:
    """The `lowprec demo` rows: accuracy, agreement, latency and size."""
    lines = [
        "| variant | threads | top-1 | agrees with fp32 | ms / batch | model KB "
        "| note |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['variant']} | {r['threads']} | {100 * r['top1']:.2f} % | "
            f"{100 * r['agreement']:.2f} % | {r['batch_ms']:.1f} | "
            f"{r['size_bytes'] / 1024:.0f} | {r.get('note', '')} |"
        )
    cal = res.get("calibration", {})
    lines += [
        "",
        f"{res['images']} images in batches of {res['batch']}, calibration "
        f"{cal.get('size')} images (seed {cal.get('seed')}), median batch over "
        f"{res['repeat']} passes taken in rounds over all rows; int8 convolutions: "
        f"{res.get('int8_conv_path')}.",
    ]
    return "\n".join(lines) + "\n"


def _path(res: dict) -> str:
    """The lowprec path the suite ran on: the half-precision one for the
    half suite (recorded since the runs of 2026-12-07), else the INT8 one."""
    low = res["lowprec"]
    if res.get("suite") == "half_gemm" and low.get("half_isa"):
        return low["half_isa"]
    return low["isa"]


def write_section(readme_path: str, text: str, start=START, end=END) -> None:
    with open(readme_path, encoding="utf-8") as f:
        doc = f.read()
    i, j = doc.find(start), doc.find(end)
    if i < 0 or j < 0 or j < i:
        msg = (
            f"{readme_path}: markers not found; add the lines\n{start}\n{end}\n"
            f"where the table belongs"
        )
        raise SystemExit(msg)
    new = doc[: i + len(start)] + "\n" + text + doc[j:]
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", help="results of `lowprec bench --json PATH`")
    p.add_argument("--write", metavar="README", help="rewrite the marked section")
    p.add_argument(
        "--section",
        help="marker name to write (default: bench / the suite / demo), e.g. "
        "int8_gemm_avx2 for <!-- int8_gemm_avx2-table:start -->",
    )
    opts = p.parse_args(argv)
    with open(opts.json, encoding="utf-8") as f:
        res = json.load(f)
    demo = "images" in res  # `lowprec demo --json` output
    text = render_demo(res) if demo else render(res)
    if opts.write:
        suite = "demo" if demo else res.get("suite", "int8_gemm")
        name = opts.section or ("bench" if suite == "int8_gemm" else suite)
        markers = (f"<!-- {name}-table:start -->", f"<!-- {name}-table:end -->")
        write_section(opts.write, text, *markers)
        print(f"updated {opts.write}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
