"""The deployment packaging: systemd units that systemd accepts and that match the server's lifecycle, and
Kubernetes manifests whose probes, grace period, ports and settings agree with the server.

systemd-analyze is required: these tests fail without it (Debian: the systemd package) unless it is absent
and LLMSERVE_SKIP_SYSTEMD=1. The manifests are read with PyYAML; kubectl, when installed, builds the
kustomizations.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmserve.settings import ENV_PREFIX, ModelSettings, Settings
from tests.conftest import missing_service

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "systemd" / "llmserve.service"
SOCKET = ROOT / "systemd" / "llmserve.socket"
TEMPLATE = ROOT / "systemd" / "llmserve@.service"
ENV_FILE = ROOT / "systemd" / "llmserve.env"
K8S = ROOT / "deploy" / "k8s"
K8S_BASE = K8S / "base"
K8S_GPU = K8S / "gpu"
INSTALL_DOC = ROOT / "docs" / "install.md"

GRACEFUL_TIMEOUT_DEFAULT: int = Settings.model_fields["graceful_timeout"].default
GPU_PREFIX = "#GPU "
MODEL_LOAD_BUDGET = 300  # seconds a start may take (TimeoutStartSec, the startup probe)

# --- systemd --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A unit file's assignments in order, per section (a key may repeat, as DeviceAllow= does)."""

    entries: tuple[tuple[str, str, str], ...]  # (section, key, value)

    @classmethod
    def parse(cls, text: str) -> Unit:
        entries = []
        section = ""
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped[0] in "#;":
                continue
            assert not stripped.endswith("\\"), f"line {number}: continuation lines are not expected"
            if stripped.startswith("["):
                section = stripped.strip("[]")
                continue
            key, equals, value = stripped.partition("=")
            assert equals, f"line {number}: not KEY=VALUE: {line!r}"
            entries.append((section, key.strip(), value.strip()))
        return cls(tuple(entries))

    def values(self, section: str, key: str) -> list[str]:
        return [value for sec, k, value in self.entries if sec == section and k == key]

    def get(self, section: str, key: str) -> str | None:
        """The value in effect: the last assignment."""
        values = self.values(section, key)
        return values[-1] if values else None

    def environment(self) -> dict[str, str]:
        env = {}
        for value in self.values("Service", "Environment"):
            for assignment in value.split():
                name, _, val = assignment.partition("=")
                env[name] = val
        return env


def seconds(value: str | None) -> float:
    """A systemd time span as seconds: "45", "45s", "5min", "1min 30s"."""
    assert value, "no time span"
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        assert unit in units, f"unexpected time unit in {value!r}"
        total += float(number) * units[unit]
    return total


def is_yes(value: str | None) -> bool:
    return (value or "").lower() in {"yes", "true", "1", "on"}


def gpu_lines(text: str) -> list[str]:
    return [line[len(GPU_PREFIX) :] for line in text.splitlines() if line.startswith(GPU_PREFIX)]


def with_gpu_block(text: str) -> str:
    """The unit as a GPU host runs it: the #GPU lines in effect (as a drop-in puts them, after the rest)."""
    lines = text.splitlines()
    gpu = gpu_lines(text)
    install = lines.index("[Install]")
    return "\n".join([*lines[:install], *gpu, "", *lines[install:]]) + "\n"


def stub_missing_executables(text: str, stub: Path) -> str:
    """Point Exec*= lines whose program is not installed here (/opt/llmserve, nvidia-modprobe) at a stub, so
    that systemd-analyze checks the rest of the unit rather than the host."""

    def replace(match: re.Match[str]) -> str:
        prefix, program = match.group(2), match.group(3)
        if os.access(program, os.X_OK):
            return match.group(0)
        return f"{match.group(1)}{prefix}{stub}"

    return re.sub(r"^(Exec\w+=)([-+@:!]*)(/\S+)", replace, text, flags=re.MULTILINE)


def systemd_analyze() -> str:
    executable = shutil.which("systemd-analyze")
    if executable is None:
        if os.environ.get("LLMSERVE_SKIP_SYSTEMD") == "1":
            pytest.skip("systemd-analyze is not installed and LLMSERVE_SKIP_SYSTEMD=1")
        pytest.fail(
            "systemd-analyze is not installed (Debian: apt-get install systemd); set LLMSERVE_SKIP_SYSTEMD=1 to skip",
            pytrace=False,
        )
    return executable


def verify(tmp_path: Path, units: dict[str, str]) -> None:
    """systemd-analyze verify accepts the units, without one warning about them."""
    executable = systemd_analyze()
    stub = tmp_path / "stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    for name, text in units.items():
        (tmp_path / name).write_text(stub_missing_executables(text, stub))
    result = subprocess.run(
        [executable, "verify", "--man=no", *(f"./{name}" for name in units)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    about_units = [line for line in output.splitlines() if any(name in line for name in units)]
    assert result.returncode == 0, output
    assert not about_units, "systemd-analyze warns about the units:\n" + "\n".join(about_units)


def test_systemd_accepts_the_service_and_socket(tmp_path: Path) -> None:
    verify(tmp_path, {"llmserve.service": SERVICE.read_text(), "llmserve.socket": SOCKET.read_text()})


def test_systemd_accepts_the_service_with_the_gpu_lines(tmp_path: Path) -> None:
    verify(tmp_path, {"llmserve.service": with_gpu_block(SERVICE.read_text())})


def test_systemd_accepts_an_instance_of_the_template(tmp_path: Path) -> None:
    verify(tmp_path, {"llmserve@gpu0.service": TEMPLATE.read_text()})


# What makes a template instance itself; every other line is llmserve.service's.
INSTANCE_LINES = {
    ("Unit", "Description"): "llmserve OpenAI-compatible LLM server (llama.cpp), instance %i",
    ("Service", "StateDirectory"): "llmserve/%i",
    ("Service", "RuntimeDirectory"): "llmserve/%i",
    ("Service", "SyslogIdentifier"): "llmserve@%i",
}
INSTANCE_ENVIRONMENT = {
    "LLMSERVE_STATE_DIR": "/var/lib/llmserve/%i",
    "PROMETHEUS_MULTIPROC_DIR": "/run/llmserve/%i/metrics",
}


def test_the_template_is_the_service_but_for_the_instance() -> None:
    """Each instance has its own state directory (its worker reports, summed by its agent check), runtime
    directory and environment file (its ports); the rest, hardening and lifecycle included, stays in step."""
    service, template = Unit.parse(SERVICE.read_text()), Unit.parse(TEMPLATE.read_text())
    instance_keys = {*INSTANCE_LINES, ("Service", "Environment"), ("Service", "EnvironmentFile")}

    def shared(unit: Unit) -> list[tuple[str, str, str]]:
        return [entry for entry in unit.entries if entry[:2] not in instance_keys]

    assert shared(template) == shared(service)
    for (section, key), value in INSTANCE_LINES.items():
        assert template.get(section, key) == value
    assert template.environment() == service.environment() | INSTANCE_ENVIRONMENT
    assert template.values("Service", "EnvironmentFile") == [
        *service.values("Service", "EnvironmentFile"),
        "/etc/llmserve/%i.env",  # its port and agent port: an instance without it would take the default port
    ]
    assert gpu_lines(TEMPLATE.read_text()) == gpu_lines(SERVICE.read_text())


def test_the_verify_check_catches_a_bad_unit(tmp_path: Path) -> None:
    """systemd-analyze exits 0 on unknown keys: the warning lines are what must fail the check."""
    bad = SERVICE.read_text().replace("[Service]\n", "[Service]\nNoSuchSetting=yes\n")
    with pytest.raises(AssertionError, match="NoSuchSetting"):
        verify(tmp_path, {"llmserve.service": bad})


def test_service_lifecycle_matches_the_server() -> None:
    unit = Unit.parse(SERVICE.read_text())
    get = unit.get
    # The server itself sends READY=1 (every worker's model loaded), RELOADING=1 and STOPPING=1, from
    # worker processes as well as the master.
    assert get("Service", "Type") == "notify"
    assert get("Service", "NotifyAccess") == "all"
    assert seconds(get("Service", "TimeoutStartSec")) >= MODEL_LOAD_BUDGET
    # SIGTERM to the master only: a second SIGTERM reaching a worker means "stop at once".
    assert get("Service", "KillSignal") == "SIGTERM"
    assert get("Service", "KillMode") == "mixed"
    assert seconds(get("Service", "TimeoutStopSec")) > GRACEFUL_TIMEOUT_DEFAULT
    assert get("Service", "Restart") == "on-failure"
    # A reload validates the settings first; only then does the master get its SIGHUP.
    assert unit.values("Service", "ExecReload") == [
        "/opt/llmserve/.venv/bin/llmserve config --quiet",
        "/bin/kill -HUP $MAINPID",
    ]
    assert get("Service", "ExecStart") == "/opt/llmserve/.venv/bin/llmserve serve"
    assert get("Service", "EnvironmentFile") == "-/etc/llmserve/llmserve.env"
    assert get("Service", "LimitNOFILE")
    assert get("Service", "User") == "llmserve"
    assert not is_yes(get("Service", "DynamicUser"))


def test_service_directories_match_the_settings() -> None:
    unit = Unit.parse(SERVICE.read_text())
    env = unit.environment()
    assert unit.get("Service", "StateDirectory") == "llmserve"
    assert unit.get("Service", "CacheDirectory") == "llmserve"
    assert unit.get("Service", "RuntimeDirectory") == "llmserve"
    assert env["LLMSERVE_STATE_DIR"] == "/var/lib/llmserve"
    assert env["LLMSERVE_CACHE_DIR"] == "/var/cache/llmserve"
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/run/llmserve/")
    assert env["LLMSERVE_CONFIG"] == "/etc/llmserve/llmserve.toml"
    assert_settings_variables(env, "llmserve.service")


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
}


def test_service_is_hardened() -> None:
    unit = Unit.parse(SERVICE.read_text())
    for key, expected in HARDENING.items():
        value = unit.get("Service", key)
        assert value is not None, f"{key}= missing"
        assert is_yes(value) if expected == "yes" else value == expected, f"{key}={value}, want {expected}"
    # Present and empty: no capabilities at all.
    assert unit.values("Service", "CapabilityBoundingSet") == [""]
    assert unit.values("Service", "AmbientCapabilities") == [""]


def test_gpu_lines_open_exactly_the_nvidia_devices() -> None:
    text = SERVICE.read_text()
    unit = Unit.parse(with_gpu_block(text))
    assert not is_yes(unit.get("Service", "PrivateDevices"))
    assert unit.get("Service", "DevicePolicy") == "closed"
    allowed = {value.split()[0] for value in unit.values("Service", "DeviceAllow")}
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"} <= allowed
    # Everything else of the hardening stays as it is on a CPU host.
    for key in HARDENING.keys() - {"PrivateDevices"}:
        assert unit.get("Service", key) == Unit.parse(text).get("Service", key), key


def test_socket_unit_hands_gunicorn_its_listener() -> None:
    socket = Unit.parse(SOCKET.read_text())
    assert socket.values("Socket", "ListenStream"), "no ListenStream="
    # PartOf= or BindsTo= would close the socket whenever the service restarts, which is what it avoids.
    assert not socket.get("Unit", "PartOf")
    assert not socket.get("Unit", "BindsTo")
    # gunicorn takes sockets from systemd only in the process systemd started (LISTEN_PID): `llmserve
    # serve` must exec gunicorn, not run it as a child.
    from gunicorn import systemd as gunicorn_systemd

    import llmserve.cli

    assert callable(gunicorn_systemd.listen_fds)
    source = Path(llmserve.cli.__file__).read_text()
    serve = source[source.index("def serve(") :]
    assert "os.execv" in serve[: serve.index("\n@")], "llmserve serve no longer execs gunicorn"


# --- the environment file -------------------------------------------------------------------------


def setting_names() -> set[str]:
    names = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    names |= {f"{ENV_PREFIX}MODEL__{name.upper()}" for name in ModelSettings.model_fields}
    return names | {"LLMSERVE_CONFIG"}


def assert_settings_variables(env: dict[str, str], where: str) -> None:
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - setting_names()
    assert not unknown, f"{where}: {sorted(unknown)} name no setting"


def read_env_file(text: str, *, commented: bool) -> dict[str, str]:
    """VAR=value lines; with commented, also the example lines left commented out (#VAR=value)."""
    env = {}
    for line in text.splitlines():
        candidate = line[1:] if commented and re.match(r"#[A-Z_][A-Z0-9_]*=", line) else line
        if not candidate.strip() or candidate.startswith("#"):
            continue
        name, equals, value = candidate.partition("=")
        assert equals and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"not VAR=value: {line!r}"
        env[name] = value
    return env


def test_env_file_names_real_settings_and_fits_the_stop_timeout() -> None:
    text = ENV_FILE.read_text()
    assert_settings_variables(read_env_file(text, commented=True), "llmserve.env")
    env = read_env_file(text, commented=False)
    stop = seconds(Unit.parse(SERVICE.read_text()).get("Service", "TimeoutStopSec"))
    assert int(env["LLMSERVE_GRACEFUL_TIMEOUT"]) < stop


# --- Kubernetes -----------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def load_yaml(text: str) -> list[Any]:
    return [document for document in yaml.safe_load_all(text) if document is not None]


def load_manifests(directory: Path) -> list[dict[str, Any]]:
    documents = []
    for path in sorted(directory.glob("*.yaml")):
        documents.extend(load_yaml(path.read_text()))
    return documents


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in documents if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "llmserve")


def env_of(spec: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in spec.get("env", []) if "value" in item}


def test_every_manifest_parses() -> None:
    files = manifest_files()
    assert {path.name for path in files} >= {"kustomization.yaml", "deployment.yaml", "deployment-gpu.yaml"}
    for path in files:
        documents = load_yaml(path.read_text())
        assert documents and all(isinstance(doc, dict) for doc in documents), path


def check_deployment(deployment: dict[str, Any], service: dict[str, Any] | None) -> None:
    pod = deployment["spec"]["template"]
    main = container(deployment)
    env = env_of(main)
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}

    def probe_target(probe: str) -> tuple[str, int]:
        get = main[probe]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert probe_target("startupProbe")[0] == "/readyz"
    assert probe_target("readinessProbe")[0] == "/readyz"
    assert probe_target("livenessProbe")[0] == "/healthz"
    assert {probe_target(p)[1] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {
        int(env["LLMSERVE_PORT"])
    }
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MODEL_LOAD_BUDGET

    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop > 0
    graceful = int(env.get("LLMSERVE_GRACEFUL_TIMEOUT", GRACEFUL_TIMEOUT_DEFAULT))
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + graceful

    assert env["LLMSERVE_HOST"] == "0.0.0.0"
    # Threads default to every CPU of the node; pinned to what the container may use.
    assert int(env["LLMSERVE_MODEL__THREADS"]) <= int(main["resources"]["limits"]["cpu"])
    for resource in ("cpu", "memory"):
        assert main["resources"]["requests"][resource] and main["resources"]["limits"][resource]

    mounts = {mount["mountPath"] for mount in main["volumeMounts"]}
    assert str(Path(env["LLMSERVE_CONFIG"]).parent) in mounts
    assert env["LLMSERVE_STATE_DIR"] in mounts
    assert env["LLMSERVE_CACHE_DIR"] in mounts
    assert str(Path(env["PROMETHEUS_MULTIPROC_DIR"]).parent) in mounts
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    if service is not None:
        labels = pod["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (ports[target] if isinstance(target, str) else target) == int(env["LLMSERVE_PORT"])


def test_deployment_probes_grace_and_ports() -> None:
    documents = load_manifests(K8S_BASE)
    check_deployment(by_kind(documents, "Deployment"), by_kind(documents, "Service"))


def test_configmap_and_deployment_env_make_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = load_manifests(K8S_BASE)
    env = env_of(container(by_kind(documents, "Deployment")))
    assert_settings_variables(env, "deployment.yaml")
    config = by_kind(documents, "ConfigMap")["data"][Path(env["LLMSERVE_CONFIG"]).name]
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and name != "LLMSERVE_CONFIG":
            monkeypatch.setenv(name, value)
    settings = Settings(**tomllib.loads(config))
    assert settings.host == "0.0.0.0"
    assert settings.tenants, "a public bind needs tenants (or allow_unauthenticated)"
    assert settings.graceful_timeout == int(env["LLMSERVE_GRACEFUL_TIMEOUT"])


def test_kustomizations_list_existing_files() -> None:
    for directory in (K8S_BASE, K8S_GPU):
        kustomization = load_yaml((directory / "kustomization.yaml").read_text())[0]
        listed = kustomization.get("resources", []) + [patch["path"] for patch in kustomization.get("patches", [])]
        assert listed, directory
        for entry in listed:
            assert (directory / entry).exists(), f"{directory.name}/kustomization.yaml: {entry} does not exist"


def test_gpu_overlay_asks_for_a_gpu_and_offloads() -> None:
    patch = load_yaml((K8S_GPU / "deployment-gpu.yaml").read_text())[0]
    main = container(patch)
    for section in ("requests", "limits"):
        assert main["resources"][section]["nvidia.com/gpu"] == 1
    assert env_of(main)["LLMSERVE_MODEL__GPU_LAYERS"] == "-1"
    assert_settings_variables(env_of(main), "deployment-gpu.yaml")


def kustomize_build(overlay: Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl kustomize`` builds from ``overlay``."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_service("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return load_yaml(result.stdout)


@pytest.mark.parametrize("overlay", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_builds(overlay: Path) -> None:
    documents = kustomize_build(overlay)
    check_deployment(by_kind(documents, "Deployment"), by_kind(documents, "Service"))


# --- docs -----------------------------------------------------------------------------------------


def test_install_guide_settings_examples_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    blocks = re.findall(r"^```toml\n(.*?)^```", INSTALL_DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks, "docs/install.md has no TOML example"
    for block in blocks:
        Settings(**tomllib.loads(block))


def test_the_reload_check_fails_on_settings_that_do_not_load(tmp_path: Path) -> None:
    """What ExecReload runs before signalling: silent and 0 on good settings, 1 with the reason on bad."""
    check = unit_reload_check()
    config = tmp_path / "llmserve.toml"
    env = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    env |= {"LLMSERVE_CONFIG": str(config), "LLMSERVE_STATE_DIR": str(tmp_path / "state")}
    config.write_text("queue_size = 8\n")
    good = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert (good.returncode, good.stdout) == (0, "")
    config.write_text("queue_size = 'many'\n")
    bad = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "queue_size" in bad.stderr


def unit_reload_check() -> list[str]:
    """The unit's first ExecReload command, run with this checkout's ``llmserve``."""
    command = Unit.parse(SERVICE.read_text()).values("Service", "ExecReload")[0].split()
    return [str(Path(sys.executable).parent / "llmserve"), *command[1:]]
