"""Model updates under load: a version loaded beside the running one, a blue-green switch, an unload,
and a bad canary rolled back, while eight clients stream on the alias the whole time.

The clients send streamed completions back to back on the alias ``chat``, each a new session (its
``user``), with the end-of-generation tokens of both models banned, so every answer must have exactly
``--max-tokens`` tokens and end with ``[DONE]``: anything else is a cut stream. The timeline:

1. ``chat`` is SmolLM2 (``chat-v1``); ``chat-v2`` (Gemma 3 270M, another file and so another version)
   is loaded beside it through the admin API;
2. blue-green: ``chat-v2`` takes 100% of the sessions, is promoted, and ``chat-v1`` is unloaded;
3. a bad canary (SmolLM2 with ``chaos_error_rate = 1``, failing every request before its first token)
   gets 20% of the sessions; the time until the judge sets its weight to 0 is measured.

Reported: requests, failed requests (any error the client saw) and cut streams in each phase, which
model answered, the seconds to roll the canary back, and the server's resident memory (all workers,
summed) with one and with two versions resident. Real models, real server; nothing is simulated.

    .venv/bin/python bench/models.py --out docs/benchmark-models.json --plot docs/benchmark-models.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import BackgroundClients
from servers import ManagedServer, ServerSpec

LLMSERVE = str(Path(sys.executable).parent / "llmserve")
PORT = 8093
URL = f"http://127.0.0.1:{PORT}"
# SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>, <reponame>; Gemma's <eos>, <end_of_turn>: banned in
# both, so every stream runs to max_tokens on either model.
BANNED = {str(token): -100 for token in (0, 1, 2, 4, 106)}
CONFIG = """
[model]
context_length = 1024
parallel = 8
embeddings = false
[models.chat-v1]
embedded = "smollm2-135m-instruct"
[aliases.chat]
stable = "chat-v1"
[canary]
min_requests = 20
window = 60
interval = 1
"""


@dataclass
class Answer:
    started: float
    ended: float
    model: str | None
    tokens: int
    done: bool
    error: str | None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def cut(self, max_tokens: int) -> bool:
        return not self.failed and (not self.done or self.tokens != max_tokens)


class Clients(BackgroundClients):
    def __init__(self, count: int, max_tokens: int) -> None:
        super().__init__(count)
        self.max_tokens = max_tokens
        self.answers: list[Answer] = []

    def _client(self, number: int) -> None:
        turn = 0
        with httpx.Client(base_url=URL, timeout=120) as client:
            while not self.stopping.is_set():
                self.answers.append(self._stream(client, f"client-{number}-{turn}"))
                turn += 1

    def _stream(self, client: httpx.Client, session: str) -> Answer:
        body = {"model": "chat", "prompt": "Tell me a story.", "max_tokens": self.max_tokens, "stream": True}
        body |= {"user": session, "logit_bias": BANNED}
        started, model, tokens, done, error = time.perf_counter(), None, 0, False, None
        try:
            with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}: {response.read()[:200].decode(errors='replace')}"
                for line in response.iter_lines() if error is None else ():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = f"stream error: {chunk['error']}"
                            break
                        model = chunk["model"]
                        tokens += sum(1 for choice in chunk["choices"] if choice["finish_reason"] is None)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Answer(started, time.perf_counter(), model, tokens, done, error)

    def phase(self, name: str, start: float, end: float) -> dict[str, Any]:
        inside = [a for a in self.answers if start <= a.started < end]
        return {
            "phase": name,
            "seconds": round(end - start, 1),
            "requests": len(inside),
            "failed": sum(a.failed for a in inside),
            "cut_streams": sum(a.cut(self.max_tokens) for a in inside),
            "errors": sorted({(a.error or "")[:100] for a in inside if a.failed}),
            "answered_by": dict(Counter(a.model for a in inside if not a.failed)),
        }


def resident_mib(server: ManagedServer) -> float:
    """Resident memory of the server's process group (master and workers), from /proc."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == server.pgid:  # the process group
                total += int(fields[21]) * 4096  # rss pages
        except (OSError, IndexError, ValueError):
            continue
    return round(total / (1 << 20), 1)


def admin(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = httpx.request(method, f"{URL}/v1/admin/{path}", json=body, timeout=60)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def wait_until(condition: Any, timeout: float, what: str) -> float:
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(what)
        time.sleep(0.2)
    return time.perf_counter() - started


def model_status(name: str) -> str | None:
    entries = {entry["id"]: entry for entry in admin("GET", "models")["data"]}
    return entries[name]["status"] if name in entries else None


def canary_weight() -> float:
    aliases = {entry["id"]: entry for entry in admin("GET", "aliases")["data"]}
    weight: float = aliases["chat"]["canary_weight"]
    return weight


def run(server: ManagedServer, args: argparse.Namespace) -> dict[str, Any]:
    memory: dict[str, float] = {}
    events: list[tuple[str, float]] = []
    phases = []

    def event(name: str) -> float:
        now = time.perf_counter()
        events.append((name, now))
        return now

    with Clients(args.clients, args.max_tokens) as clients:
        start = time.perf_counter()
        time.sleep(args.settle)
        memory["one version (chat-v1)"] = resident_mib(server)
        mark = event("load chat-v2")
        admin("POST", "models", {"id": "chat-v2", "embedded": "gemma-3-270m"})
        wait_until(lambda: model_status("chat-v2") == "ready", 120, "chat-v2 ready")
        time.sleep(args.settle)
        memory["two versions (chat-v1, chat-v2)"] = resident_mib(server)
        phases.append(clients.phase("warm-up, then chat-v2 loaded beside chat-v1", start, mark + args.settle))

        mark = event("blue-green: chat-v2 at 100%")
        admin("PUT", "aliases/chat", {"stable": "chat-v1", "canary": "chat-v2", "canary_weight": 100})
        time.sleep(args.settle)
        event("promote chat-v2")
        admin("POST", "aliases/chat/promote")
        event("unload chat-v1")
        admin("DELETE", "models/chat-v1")
        wait_until(lambda: model_status("chat-v1") is None, 120, "chat-v1 gone")
        time.sleep(args.settle)
        memory["one version again (chat-v2)"] = resident_mib(server)
        phases.append(clients.phase("blue-green switch, promotion, unload", mark, time.perf_counter()))

        admin("POST", "models", {"id": "chat-bad", "embedded": "smollm2-135m-instruct", "chaos_error_rate": 1.0})
        wait_until(lambda: model_status("chat-bad") == "ready", 120, "chat-bad ready")
        mark = event("bad canary at 20%")
        admin("PUT", "aliases/chat", {"stable": "chat-v2", "canary": "chat-bad", "canary_weight": 20})
        rollback_s = wait_until(lambda: canary_weight() == 0, 120, "canary rolled back")
        event("canary weight 0")
        time.sleep(args.settle)
        phases.append(clients.phase("bad canary at 20% until rolled back", mark, time.perf_counter()))
        answers = list(clients.answers)
    metrics = httpx.get(f"{URL}/metrics", timeout=10).text
    retries = [line for line in metrics.splitlines() if line.startswith("llmserve_canary_retries_total{")]
    return {
        "phases": phases,
        "canary_rollback_seconds": round(rollback_s, 2),
        "canary_retries": retries,
        "resident_memory_mib": memory,
        "timeline": {
            "start": start,
            "events": [(name, round(at - start, 2)) for name, at in events],
            "answers": [(round(a.ended - start, 2), a.model, a.failed) for a in answers],
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    answers = sorted(result["timeline"]["answers"])
    models = sorted({model for _, model, failed in answers if not failed and model})
    figure, axis = plt.subplots(figsize=(11, 4.5))
    for label, chosen in [*((f"answered by {m}", m) for m in models), ("failed (the client saw an error)", None)]:
        times = [at for at, model, failed in answers if (failed if chosen is None else model == chosen and not failed)]
        axis.step([0.0, *times], range(len(times) + 1), where="post", label=label)
    previous = -10.0
    for name, at in result["timeline"]["events"]:
        axis.axvline(at, color="grey", linestyle=":", linewidth=1)
        offset = 0.6 if at - previous < 1.5 else 0.0  # events a moment apart: labels side by side
        axis.text(at + offset, axis.get_ylim()[1] * 0.98, name, rotation=90, fontsize=7, va="top", ha="right")
        previous = at
    axis.set_xlabel("seconds")
    axis.set_ylabel("streams completed (cumulative)")
    axis.set_title(f"Alias 'chat' under 8 streams: rollback in {result['canary_rollback_seconds']} s")
    axis.legend(loc="center left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds of load before and after each step")
    parser.add_argument("--logs", default=".bench/logs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    state = Path(args.logs) / "models-state"
    config = Path(args.logs) / "models.toml"
    config.write_text(CONFIG)
    env = {"LLMSERVE_PORT": str(PORT), "LLMSERVE_CONFIG": str(config), "LLMSERVE_STATE_DIR": str(state)}
    env["LLMSERVE_LOG_LEVEL"] = "warning"
    (state / "models.json").unlink(missing_ok=True)  # start from the configuration alone
    server = ManagedServer(
        ServerSpec("models", [LLMSERVE, "serve"], URL, "/readyz", Path(args.logs) / "models.log", env)
    )
    server.start()
    try:
        server.wait_ready(240)
        result = run(server, args)
    finally:
        server.stop()
    summary = {key: value for key, value in result.items() if key != "timeline"}
    print(json.dumps(summary, indent=2), flush=True)
    args.out.write_text(
        json.dumps({"args": {**vars(args), "out": str(args.out), "plot": str(args.plot)}, **result}, indent=2) + "\n"
    )
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
