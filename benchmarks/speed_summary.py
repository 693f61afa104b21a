"""The targets of ``benchmarks/speed.py`` over several whole runs: per prompt length and target, every
run's ratio, their median, and whether the median meets the target.

    python benchmarks/speed_summary.py RUN.json [RUN.json ...] [--out benchmarks/results/speed_summary.json]

On a shared 2-core machine one run's ratios move from run to run (by up to a third when the models
were timed one after another, minutes apart; less now that ``speed.py`` times them rep by rep in
turn), so a single run can meet a target by luck or miss it by bad luck.
Every ratio here still compares models of the same run; the runs must come from the same command
and code (checked: their ``command`` minus ``--out``/``--plot`` must agree).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _quant import ROOT, rel

BOUNDS = ("bound_if_linears_free", "bound_if_linears_read_at_baselines_bandwidth", "bound_if_linears_as_fast_as_baselines",
          "bound_if_baselines_time_minus_weight_reads")


def _command(run: dict) -> str:
    words, out, skip = run["command"].split(), [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--out", "--plot"):
            skip = True
        else:
            out.append(word)
    return " ".join(out)


def summarize(runs: dict[str, dict]) -> dict:
    """``{length: {target: {ratios, median, min, max, target, met_by_median, met_in_runs}}}`` plus
    the median of each ``why_missed`` bound over the runs that missed and, where every run kept
    per-rep times, each run's paired median ratio and how many reps met the target over all runs."""
    commands = {_command(run) for run in runs.values()}
    if len(commands) != 1:
        raise SystemExit(f"the runs come from different commands: {sorted(commands)}")
    out: dict[str, dict] = {}
    first = next(iter(runs.values()))
    for length, checks in first["targets"].items():
        for key, check in checks.items():
            ratios = [run["targets"][length][key]["ratio"] for run in runs.values()]
            median = statistics.median(ratios)
            row = {
                "ratios": ratios, "median": round(median, 3), "min": min(ratios), "max": max(ratios),
                "target": check["target"], "met_by_median": median >= check["target"],
                "met_in_runs": sum(run["targets"][length][key]["met"] for run in runs.values()),
            }
            reps_met = [run["targets"][length][key].get("reps_met") for run in runs.values()]
            if all(reps_met):  # every run kept paired per-rep ratios: pool their counts
                met, total = (sum(int(r.split("/")[i]) for r in reps_met) for i in (0, 1))
                row["reps_met"] = f"{met}/{total}"
                row["paired_medians"] = [run["targets"][length][key]["paired_median"] for run in runs.values()]
            for bound in BOUNDS:
                values = [run["why_missed"][length][key][bound] for run in runs.values()
                          if bound in run.get("why_missed", {}).get(length, {}).get(key, {})]
                if values:
                    row[f"{bound}_median"] = round(statistics.median(values), 3)
            out.setdefault(length, {})[key] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed_summary.json"))
    args = ap.parse_args()
    runs = {rel(path): json.loads(Path(path).read_text()) for path in args.runs}
    targets = summarize(runs)
    result = {
        "runs": {name: {"loadavg": run["loadavg"], "wall_s": run["wall_s"]} for name, run in runs.items()},
        "command": _command(next(iter(runs.values()))),
        "targets": targets,
        "summary_command": "python benchmarks/speed_summary.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'prompt':>6} {'target':<16} {'runs':<24} {'median':>7} {'goal':>5}  met (median; runs)")
    for length, checks in targets.items():
        for key, row in checks.items():
            ratios = ", ".join(f"{r:.2f}" for r in row["ratios"])
            print(f"{length:>6} {key:<16} {ratios:<24} {row['median']:>7.2f} {row['target']:>5}  "
                  f"{'yes' if row['met_by_median'] else 'NO'}; {row['met_in_runs']}/{len(row['ratios'])}"
                  + (f"; reps {row['reps_met']}" if "reps_met" in row else ""))
    print(f"\nwrote {rel(args.out)}")


if __name__ == "__main__":
    main()
