"""Render comparison results as a markdown table and a PNG plot.

Input is the dict ``compare.py`` writes to JSON: ``meta`` (how the run was
made) and ``runs`` (one entry per concurrency level and server, holding the
``loadgen`` summary or an error). Keeping rendering separate lets a JSON file
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


def _reference_tps(runs: list[dict[str, Any]], concurrency: int) -> float | None:
    for run in runs:
        if run["server"] == REFERENCE and run["concurrency"] == concurrency:
            return _tokens_per_s(run)
    return None


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
        f"temperature {meta.get('temperature')}, unique prompts: {meta.get('unique_prompts')}",
        f"- llama-server: `{meta.get('llama_argv')}` ({meta.get('llama_version')})",
        f"- ours: `{meta.get('ours_cmd')}` at {meta.get('ours_url')}",
        f"- method: {meta.get('method')}",
        "",
        "| concurrency | server | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
        "| ITL p99 ms | health p50 ms | health p99 ms | errors | tok/s ours/llama |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        result = run.get("result")
        if result is None:
            lines.append(
                f"| {run['concurrency']} | {run['server']} | failed: "
                f"{str(run.get('error', '')).splitlines()[0][:80] if run.get('error') else '?'} "
                "| | | | | | | | |"
            )
            continue
        ratio = "—"
        if run["server"] != REFERENCE:
            ref = _reference_tps(runs, run["concurrency"])
            tps = _tokens_per_s(run)
            if ref and tps is not None:
                ratio = f"{tps / ref:.2f}"
        lines.append(
            "| "
            + " | ".join(
                [
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
                    ratio,
                ]
            )
            + " |"
        )
    notes = [n for n in meta.get("notes", []) if n]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Tokens/s and TTFT p99 against concurrency, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    servers = list(dict.fromkeys(run["server"] for run in runs))
    levels = sorted({run["concurrency"] for run in runs})
    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in servers:
        mine = sorted((r for r in runs if r["server"] == server), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in mine]
        ax_tps.plot(xs, [_tokens_per_s(r) for r in mine], marker="o", label=server)
        ax_ttft.plot(xs, [_metric(r, "ttft_ms", "p99") for r in mine], marker="o", label=server)
    for ax, title, ylabel in (
        (ax_tps, "Aggregate generation throughput", "tokens/s"),
        (ax_ttft, "Time to first token, p99", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels)
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if servers:
            ax.legend()
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
