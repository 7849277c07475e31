"""Render comparison results as a markdown table and a PNG plot.

Input is the dict ``compare.py`` writes to JSON: ``meta`` (how the run was
made) and ``runs`` (one entry per case, concurrency level and server, holding
the ``loadgen`` summary or an error; files from before cases existed measured
greedy completions). Keeping rendering separate lets a JSON file
be re-rendered without re-running the benchmark::

    python bench/report.py .bench/compare/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REFERENCE = "llama-server"
OLDER_CASE = "completions:greedy"  # what runs recorded before cases existed measured


def case_of(run: dict[str, Any]) -> str:
    return str(run.get("case", OLDER_CASE))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _metric(run: dict[str, Any], key: str, stat: str) -> float | None:
    result = run.get("result")
    return None if not result else result.get(key, {}).get(stat)


def _tokens_per_s(run: dict[str, Any]) -> float | None:
    result = run.get("result")
    return None if not result else result.get("tokens_per_s")


def _reference_tps(runs: list[dict[str, Any]], case: str, concurrency: int) -> float | None:
    for run in runs:
        if run["server"] == REFERENCE and case_of(run) == case and run["concurrency"] == concurrency:
            return _tokens_per_s(run)
    return None


def ratio(runs: list[dict[str, Any]], run: dict[str, Any]) -> float | None:
    """Our tokens/s over llama-server's in the same case and level."""
    reference = _reference_tps(runs, case_of(run), run["concurrency"])
    tps = _tokens_per_s(run)
    return tps / reference if reference and tps is not None else None


def markdown(data: dict[str, Any]) -> str:
    """Full markdown report: provenance, settings, and the results table."""
    meta = data["meta"]
    runs = data["runs"]
    lines = [
        f"# {meta.get('ours_name', 'ours')} vs llama-server",
        "",
        f"Produced by: `{meta['command']}`",
        "",
        f"- date: {meta.get('date')}",
        f"- host: {meta.get('host')}",
        f"- model: `{meta.get('model')}`",
        f"- threads: {meta.get('threads')}, parallel slots: {meta.get('parallel')}, "
        f"context per slot: {meta.get('ctx_per_slot')}",
        f"- per level: {meta.get('requests_per_worker')} requests per concurrent stream, "
        f"max_tokens {meta.get('max_tokens')} (EOG banned: {meta.get('banned_token_ids')}), "
        f"unique prompts: {meta.get('unique_prompts')}",
        f"- cases (endpoint:sampling): {meta.get('cases', [OLDER_CASE])}; sampling fields sent: "
        f"{meta.get('samplings', {'greedy': {'temperature': meta.get('temperature')}})}",
        f"- llama-server: `{meta.get('llama_argv')}` ({meta.get('llama_version')})",
        f"- ours: `{meta.get('ours_cmd')}` at {meta.get('ours_url')}",
        f"- method: {meta.get('method')}",
        "",
        "| case | concurrency | server | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| ITL p99 ms | health p50 ms | health p99 ms | errors | tok/s ours/llama |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        result = run.get("result")
        if result is None:
            lines.append(
                f"| {case_of(run)} | {run['concurrency']} | {run['server']} | failed: "
                f"{str(run.get('error', '')).splitlines()[0][:80] if run.get('error') else '?'} "
                "| | | | | | | | |"
            )
            continue
        ours_over_llama = ratio(runs, run) if run["server"] != REFERENCE else None
        lines.append(
            "| "
            + " | ".join(
                [
                    case_of(run),
                    str(run["concurrency"]),
                    run["server"],
                    _fmt(result.get("tokens_per_s")),
                    _fmt(_metric(run, "ttft_ms", "p50")),
                    _fmt(_metric(run, "ttft_ms", "p99")),
                    _fmt(_metric(run, "itl_ms", "p50"), 2),
                    _fmt(_metric(run, "itl_ms", "p99"), 2),
                    _fmt(_metric(run, "health_ms", "p50"), 2),
                    _fmt(_metric(run, "health_ms", "p99"), 2),
                    str(result.get("errors")),
                    _fmt(ours_over_llama, 2),
                ]
            )
            + " |"
        )
    notes = [n for n in meta.get("notes", []) if n]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Per case, against concurrency: our tokens/s over llama-server's, and both servers' tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    cases = list(dict.fromkeys(case_of(run) for run in runs))
    levels = sorted({run["concurrency"] for run in runs})
    fig, (ax_ratio, ax_tps) = plt.subplots(1, 2, figsize=(13, 4.8))
    for number, case in enumerate(cases):
        color = f"C{number % 10}"
        for server in dict.fromkeys(run["server"] for run in runs):
            mine = sorted(
                (r for r in runs if case_of(r) == case and r["server"] == server), key=lambda r: r["concurrency"]
            )
            xs = [r["concurrency"] for r in mine]
            reference = server == REFERENCE
            ax_tps.plot(
                xs,
                [_tokens_per_s(r) for r in mine],
                marker="o",
                color=color,
                linestyle="--" if reference else "-",
                label=None if reference else case,
            )
            if not reference:
                ax_ratio.plot(xs, [ratio(runs, r) for r in mine], marker="o", color=color, label=case)
    ax_ratio.axhline(1.0, color="grey", linewidth=1)
    for ax, title, ylabel in (
        (ax_ratio, f"{data['meta'].get('ours_name', 'ours')} tokens/s / llama-server tokens/s", "ratio"),
        (ax_tps, "Aggregate generation throughput (dashed: llama-server)", "tokens/s"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    ax_ratio.legend(fontsize=8)
    fig.suptitle(f"max_tokens={data['meta'].get('max_tokens')}, threads={data['meta'].get('threads')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(data: dict[str, Any], json_path: Path, md_path: Path, png_path: Path) -> None:
    """Write raw JSON, markdown and plot (plot last: it is the only optional part)."""
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(data), encoding="utf-8")
    plot(data, png_path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-render a compare.py JSON file.")
    p.add_argument("json_file", type=Path)
    args = p.parse_args(argv)
    try:
        data = json.loads(args.json_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"report: cannot read {args.json_file}: {exc}", file=sys.stderr)
        return 2
    md_path = args.json_file.with_suffix(".md")
    md_path.write_text(markdown(data), encoding="utf-8")
    plot(data, args.json_file.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
