"""Plot the fleet benchmark's results (bench/fleet.py's JSON files) into one PNG, and print them as the
Markdown table of docs/benchmarks.md::

    .venv/bin/python bench/fleet_plot.py docs/benchmark-fleet.json docs/benchmark-fleet-slow.json \\
        docs/benchmark-fleet-affinity.json --out docs/benchmark-fleet.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def label(report: dict[str, Any], run: dict[str, Any]) -> str:
    kind = "SIMULATED" if report["simulated"] else "real"
    return f"{report['scenario']} {run['load']:.0%}\n{run['arm']} ({kind})"


def table(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """One row per run: latency percentiles, the largest share of requests, the most held at once."""
    rows = [
        "| scenario | load | arm | failed | TTFT p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | largest share "
        "| most held at once | prefix hit |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for report, run in runs:
        ttft, itl = run["ttft_ms"], run["itl_ms"]
        held = " / ".join(str(run["max_held"][name]) for name in sorted(run["max_held"]))
        hit = run.get("prefix_hit_ratio")
        rows.append(
            f"| {report['scenario']} | {run['load']:.0%} | {run['arm']} | {run['failed']} "
            f"| {ttft['p50']:.0f} / {ttft['p90']:.0f} / {ttft['p99']:.0f} | {itl['p50']:.1f} / {itl['p99']:.1f} "
            f"| {max(run['share'].values()):.3f} | {held} | {'-' if hit is None else f'{hit:.3f}'} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [json.loads(path.read_text()) for path in args.reports]
    runs = [(report, run) for report in reports for run in report["runs"]]
    print(table(runs))
    labels = [label(report, run) for report, run in runs]
    positions = range(len(runs))
    figure, (latency, share, held) = plt.subplots(3, 1, figsize=(max(8, 1.2 * len(runs)), 11))
    for stat, offset in (("p50", -0.2), ("p99", 0.2)):
        latency.bar([p + offset for p in positions], [run["ttft_ms"][stat] for _, run in runs], 0.4, label=stat)
    latency.set_yscale("log")
    latency.set_ylabel("TTFT (ms, log)")
    latency.set_title("Replicas behind HAProxy (each bar says whether they were SIMULATED): time to first token")
    latency.legend()
    replicas = sorted({name for _, run in runs for name in run["share"]})
    width = 0.8 / len(replicas)
    for index, name in enumerate(replicas):
        offsets = [p - 0.4 + width * (index + 0.5) for p in positions]
        share.bar(offsets, [run["share"].get(name, 0) for _, run in runs], width, label=name)
        held.bar(offsets, [run["max_held"].get(name, 0) for _, run in runs], width, label=name)
    share.axhline(1.25 / len(replicas), color="grey", linestyle=":", linewidth=1)  # 1.25/N of the largest fleet
    share.set_ylabel("share of requests")
    share.legend(fontsize=7, ncol=len(replicas))
    held.set_ylabel("most requests held at once")
    for axis in (latency, share, held):
        axis.set_xticks(list(positions), labels, fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
