"""Pool several `lowprec bench --json` runs of one suite into one result.

    python bench/merge_runs.py run1.json run2.json run3.json -o merged.json

Why: these machines are shared, and a neighbour's burst slows a whole run by
10-40 % for seconds at a time (the same 2-thread GEMM measured 0.55x and 1.05x
its baseline in two runs ten minutes apart). Pooling the timed samples of runs
taken at different times and taking the median of the pool is less at the mercy
of one burst than any single run. Every implementation's samples are pooled the
same way (lowprec and baselines alike); GOP/s, the ratio to the best counted
baseline and % of peak are recomputed as lowprec.bench computes them, with the
best measured peak of the runs (a peak is a property of the hardware).
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics


def _pool(entries: list[dict], ops: int) -> dict:
    samples = [s for e in entries for s in e["samples_s"]]
    med = statistics.median(samples)
    return {
        "gops": ops / med / 1e9,
        "gops_min": ops / max(samples) / 1e9,
        "gops_max": ops / min(samples) / 1e9,
        "median_s": med,
        "samples_s": samples,
        "calls_per_sample": [e.get("calls_per_sample") for e in entries],
    }


def merge(runs: list[dict]) -> dict:
    suites = {r["suite"] for r in runs}
    if len(suites) != 1:
        raise SystemExit(f"runs of different suites: {sorted(suites)}")
    out = dict(runs[0])
    peaks: dict[str, float] = {}
    for r in runs:
        for t, p in (r.get("peak_gops") or {}).items():
            if p:
                peaks[t] = max(peaks.get(t, 0.0), p)
    out["peak_gops"] = peaks
    by_group = [{row["group"]: row for row in r["rows"]} for r in runs]
    rows = []
    for row in runs[0]["rows"]:
        same = [g[row["group"]] for g in by_group if row["group"] in g]
        new = dict(row)
        new["lowprec"] = _pool([s["lowprec"] for s in same], row["ops"])
        new["baselines"] = {}
        for name, b in row["baselines"].items():
            timed = [
                s["baselines"][name]
                for s in same
                if "gops" in s["baselines"].get(name, {})
            ]
            if timed:
                new["baselines"][name] = {
                    **_pool(timed, row["ops"]),
                    "counts": b.get("counts"),
                }
            else:
                new["baselines"][name] = b
        counted = {
            k: v["gops"]
            for k, v in new["baselines"].items()
            if v.get("counts") and "gops" in v
        }
        best = max(counted, key=counted.get) if counted else None
        new["best_baseline"] = best
        new["best_baseline_gops"] = counted.get(best)
        new["ratio"] = new["lowprec"]["gops"] / counted[best] if best else None
        if row.get("peak_kind"):
            # a per-row peak (the half suite: the FMA or vdpbf16ps rate of the
            # row's own instruction), the best of the runs
            rp = [s["peak_gops"] for s in same if s.get("peak_gops")]
            peak = max(rp) if rp else None
        else:
            peak = peaks.get(str(row["threads"]))
        new["peak_gops"] = peak
        new["pct_peak"] = 100.0 * new["lowprec"]["gops"] / peak if peak else None
        new["merged_runs"] = len(same)
        rows.append(new)
    out["rows"] = rows
    out["warnings"] = sorted({w for r in runs for w in r.get("warnings", [])})
    out["settings"] = {
        **runs[0]["settings"],
        "repeat": sum(r["settings"]["repeat"] for r in runs),
    }
    # rounds in all, where every run took turns (a run from before --rounds
    # timed each library in one block: no rounds to report)
    out["settings"].pop("rounds", None)
    if all("rounds" in r["settings"] for r in runs):
        out["settings"]["rounds"] = sum(r["settings"]["rounds"] for r in runs)
    out["date"] = " / ".join(r["date"] for r in runs)
    out["command"] = f"{runs[0]['command']} (run {len(runs)}x, samples pooled)"
    out["merged_from"] = [r["date"] for r in runs]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="JSON files of one suite")
    p.add_argument("-o", "--output", required=True)
    opts = p.parse_args(argv)
    runs = []
    for path in opts.runs:
        with open(path) as f:
            runs.append(json.load(f))
    with open(opts.output, "w") as f:
        json.dump(merge(runs), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
