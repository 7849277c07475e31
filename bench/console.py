"""What an open console costs: tokens/s at 8 streams with the console's status view open in a browser
(refreshing every 2 s) against the same load with no browser, on the real model.

One server; after a warm-up round, rounds alternate the two arms in both orders. The open arm's page is
the distribution's Chromium driven by Playwright, opened before the round's load and closed after it.
Reported: each arm's tokens/s per round, the median paired ratio, and the closed arm's own spread (the
noise the ratio is judged against).

    .venv/bin/python bench/console.py --rounds 6 --out docs/benchmark-console.json  # and its .png
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from playwright.sync_api import Browser, sync_playwright

from bench.loadgen import LoadConfig, run_load
from tests.integration.conftest import MODEL, start_server, stop_server

STATUS_POLLS = "performance.getEntriesByType('resource').filter((entry) => entry.name.endsWith('/v1/status')).length"


@contextmanager
def console_open(browser: Browser, url: str, polls: list[int]) -> Iterator[None]:
    """The status view open in a fresh tab for the duration; how many times it polled goes to ``polls``."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    page.locator("#models-table tbody tr").first.wait_for()
    try:
        yield
    finally:
        polls.append(int(page.evaluate(STATUS_POLLS)))
        context.close()


def measure(browser: Browser, rounds: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        config = f"[model]\nembedded = '{MODEL}'\nparallel = {concurrency}\ncontext_length = {concurrency * 512}\n"
        server = start_server(Path(directory), config)
        arms: dict[str, list[float]] = {"closed": [], "open": []}
        polls: list[int] = []
        try:
            for number in range(rounds + 1):  # the first round warms the server up and is not counted
                order = ["closed", "open"] if number % 2 else ["open", "closed"]
                for arm in order:
                    around: AbstractContextManager[None] = (
                        console_open(browser, server.url, polls) if arm == "open" else nullcontext()
                    )
                    with around:
                        load = LoadConfig(
                            base_url=server.url,
                            model=MODEL,
                            concurrency=concurrency,
                            requests_per_worker=2,
                            max_tokens=max_tokens,
                        )
                        result = run_load(load)
                    if result["errors"] or result["short_responses"]:
                        raise RuntimeError(f"{arm}: {result['errors']} errors: {result['error_samples']}")
                    if number:
                        arms[arm].append(result["tokens_per_s"])
        finally:
            stop_server(server)
    paired = [opened / closed for closed, opened in zip(arms["closed"], arms["open"], strict=True)]
    closed = arms["closed"]
    return {
        "model": f"{MODEL} (real)",
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "rounds": arms,
        "status_polls_per_open_round": polls[1:],
        "closed_tokens_per_s": statistics.median(closed),
        "open_tokens_per_s": statistics.median(arms["open"]),
        "median_paired_ratio": round(statistics.median(paired), 4),
        "closed_spread": round((max(closed) - min(closed)) / statistics.median(closed), 4),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for offset, arm in ((-0.2, "closed"), (0.2, "open")):
        values = report["rounds"][arm]
        axis.bar([i + 1 + offset for i in range(len(values))], values, width=0.4, label=f"console {arm}")
    axis.set_xlabel("round (the two arms back to back, in alternating order)")
    axis.set_ylabel(f"tokens/s, {report['concurrency']} streams")
    axis.set_title(
        f"open/closed {report['median_paired_ratio']:.3f} (median of rounds); closed spread "
        f"{report['closed_spread']:.1%}"
    )
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark-console.json"))
    parser.add_argument("--plot-only", action="store_true", help="only plot the results --out holds")
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads(args.out.read_text())
    else:
        chromium = shutil.which("chromium")
        if chromium is None:
            raise SystemExit("needs Chromium: apt-get install chromium")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            report = measure(browser, args.rounds, args.concurrency, args.max_tokens)
            browser.close()
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
