"""The autoscaling overlays (deploy/k8s/keda, deploy/k8s/hpa): they build, scale the shipped Deployment on
the gauge the server exports, reach a tenfold spike in one step and scale down slowly enough not to
flap. Read with PyYAML; kubectl builds the kustomizations (required under ``make test``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from llmserve.metrics import LLMMetrics
from tests.test_deploy_units import K8S, by_kind, check_deployment, kustomize_build, load_yaml

KEDA, HPA = K8S / "keda", K8S / "hpa"
SIGNAL = "llmserve_desired_replicas"
HPA_SYNC_SECONDS = 15  # kube-controller-manager's --horizontal-pod-autoscaler-sync-period default
SPIKE = 10


def scaler_spec(overlay: Path, documents: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(target reference, HPA behaviour, the metric or query it reads) of the overlay's autoscaler."""
    if overlay == KEDA:
        scaled = by_kind(documents, "ScaledObject")["spec"]
        [trigger] = scaled["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["threshold"] == "1"
        assert scaled["minReplicaCount"] >= 2 and scaled["cooldownPeriod"] >= 300
        return (
            scaled["scaleTargetRef"],
            scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
            trigger["metadata"]["query"],
        )
    hpa = by_kind(documents, "HorizontalPodAutoscaler")["spec"]
    [metric] = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpa["minReplicas"] >= 2
    return hpa["scaleTargetRef"], hpa["behavior"], metric["pods"]["metric"]["name"]


@pytest.mark.parametrize("overlay", [KEDA, HPA], ids=["keda", "hpa"])
def test_the_overlay_scales_the_shipped_deployment_on_the_exported_signal(overlay: Path) -> None:
    documents = kustomize_build(overlay)
    deployment = by_kind(documents, "Deployment")
    check_deployment(deployment, by_kind(documents, "Service"))
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    target, _, reads = scaler_spec(overlay, documents)
    assert target["name"] == deployment["metadata"]["name"]
    assert SIGNAL in reads
    assert LLMMetrics.create(CollectorRegistry()).desired_replicas._name == SIGNAL  # what the server exports


def replicas_after(behavior: dict[str, Any], start: int, wanted: int, seconds: int) -> int:
    """What the HPA's scale-up rules allow after ``seconds`` of syncs, from ``start`` toward ``wanted``."""
    up = behavior["scaleUp"]
    assert up.get("stabilizationWindowSeconds", 0) == 0
    current = start
    for _ in range(seconds // HPA_SYNC_SECONDS):
        allowed = []
        for policy in up["policies"]:
            assert policy["periodSeconds"] <= HPA_SYNC_SECONDS  # each sync may take a full step
            if policy["type"] == "Percent":
                allowed.append(math.ceil(current * (1 + policy["value"] / 100)))
            else:
                allowed.append(current + policy["value"])
        step = max(allowed) if up.get("selectPolicy", "Max") == "Max" else min(allowed)
        current = min(wanted, step)
    return current


@pytest.mark.parametrize("overlay", [KEDA, HPA], ids=["keda", "hpa"])
def test_a_tenfold_spike_is_one_sync_and_scaling_down_waits_and_steps(overlay: Path) -> None:
    _, behavior, _ = scaler_spec(overlay, kustomize_build(overlay))
    assert replicas_after(behavior, 2, 2 * SPIKE, HPA_SYNC_SECONDS) == 2 * SPIKE
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300  # no scale-down in the 5 minutes after a spike
    assert down.get("selectPolicy") == "Min"
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1 and policy["periodSeconds"] >= 60


def test_the_adapter_rule_serves_the_signal_per_pod() -> None:
    values = load_yaml((HPA / "prometheus-adapter-values.yaml").read_text())[0]
    [rule] = values["rules"]["custom"]
    assert rule["seriesQuery"].startswith(SIGNAL + "{") and rule["name"]["as"] == SIGNAL
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
