"""The /metrics endpoint in a single process (the multi-worker view is tested with a real server)."""

import sys
import types
from dataclasses import dataclass, field

import pytest
from flask.testing import FlaskClient

from llmserve.api.runner import Usage
from llmserve.engine.stats import EngineStats, StepSample, TenantLoad
from llmserve.gpu import GpuMonitor, GpuReading
from llmserve.metrics import EXTENSION, LLMMetrics

MODEL = "gemma-3-270m"


def scrape(client: FlaskClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_http_requests_are_counted_by_endpoint_and_status(client: FlaskClient) -> None:
    client.get("/v1/models")
    client.get("/v1/models/unknown")
    text = scrape(client)
    count = "llmserve_http_request_duration_seconds_count"
    assert f'{count}{{endpoint="models.list_models",method="GET",status="200"}} 1.0' in text
    assert f'{count}{{endpoint="models.retrieve_model",method="GET",status="404"}} 1.0' in text


def test_rejections_are_counted_by_reason(client: FlaskClient) -> None:
    client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})  # the model is still loading
    assert f'llmserve_rejections_total{{model="{MODEL}",reason="model_loading"}} 1.0' in scrape(client)


@dataclass
class Finished:
    usage: Usage
    admitted_at: float | None = 10.1
    first_token_at: float | None = 10.2
    token_gaps: list[float] = field(default_factory=lambda: [0.03, 0.03, 0.2])
    cancelled_by: str | None = None


def test_requests_reach_the_llm_metrics_by_tenant(client: FlaskClient) -> None:
    metrics: LLMMetrics = client.application.extensions[EXTENSION]
    metrics.record_request(MODEL, "default", Finished(Usage(prompt_tokens=7, completion_tokens=3)), 10.0, 11.0)
    metrics.record_request(MODEL, "default", Finished(Usage(), cancelled_by="client_disconnected"), 10.0, 10.5)
    text = scrape(client)
    labels = f'model="{MODEL}",tenant="default"'
    assert f"llmserve_prompt_tokens_total{{{labels}}} 7.0" in text
    assert f"llmserve_generation_tokens_total{{{labels}}} 3.0" in text
    assert f'llmserve_time_to_first_token_seconds_bucket{{le="0.25",{labels}}} 2.0' in text
    assert f'llmserve_queue_wait_seconds_bucket{{le="0.1",{labels}}} 2.0' in text
    assert f'llmserve_inter_token_latency_seconds_bucket{{le="0.04",model="{MODEL}"}} 4.0' in text
    assert f'llmserve_inter_token_latency_seconds_count{{model="{MODEL}"}} 6.0' in text
    assert f'llmserve_cancellations_total{{model="{MODEL}",reason="client_disconnected"}} 1.0' in text


def test_engine_state_reaches_the_llm_metrics(client: FlaskClient) -> None:
    metrics: LLMMetrics = client.application.extensions[EXTENSION]
    stats = EngineStats(
        slots_total=8, slots_busy=2, queued=1, kv_cells_used=40, tenants={"default": TenantLoad(2, 1, 0.0)}
    )
    steps = [StepSample(0.05, 9), StepSample(0.02, 2)]
    metrics.publish_engine(MODEL, stats, steps, ["default", "idle"], kv_cells=8 * 4096)
    text = scrape(client)
    assert f'llmserve_slots_busy{{model="{MODEL}"}} 2.0' in text
    assert f'llmserve_kv_cells_total{{model="{MODEL}"}} 32768.0' in text
    assert f'llmserve_requests_running{{model="{MODEL}",tenant="default"}} 2.0' in text
    assert f'llmserve_requests_waiting{{model="{MODEL}",tenant="default"}} 1.0' in text
    assert f'llmserve_requests_waiting{{model="{MODEL}",tenant="idle"}} 0.0' in text
    assert f'llmserve_engine_batch_tokens_bucket{{le="8.0",model="{MODEL}"}} 1.0' in text
    assert f'llmserve_engine_step_seconds_count{{model="{MODEL}"}} 2.0' in text


def test_error_responses_are_counted_by_status_and_code(client: FlaskClient) -> None:
    client.get("/v1/nowhere")
    client.post("/v1/completions", data="not json", content_type="application/json")
    text = scrape(client)
    assert 'llmserve_errors_total{code="not_found",status="404"} 1.0' in text
    assert 'llmserve_errors_total{code="invalid_request_error",status="400"} 1.0' in text


def test_process_and_gpu_readings_reach_the_metrics(client: FlaskClient) -> None:
    metrics: LLMMetrics = client.application.extensions[EXTENSION]
    metrics.publish_process(123 << 20, [GpuReading(0, "Test GPU", 0.5, 1 << 30, 8 << 30)])
    text = scrape(client)
    assert "llmserve_process_resident_memory_bytes 1.28974848e+08" in text
    assert 'llmserve_gpu_memory_total_bytes{gpu="0",name="Test GPU"} 8.589934592e+09' in text
    assert 'llmserve_gpu_utilization_ratio{gpu="0",name="Test GPU"} 0.5' in text


class NoDriver(types.ModuleType):
    """NVML's bindings on a host without the NVIDIA driver: initialising fails."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:
        raise self.NVMLError("Driver Not Loaded")


@pytest.mark.parametrize("bindings", [None, NoDriver("pynvml")], ids=["no-bindings", "no-driver"])
def test_no_gpu_means_no_gpu_series(monkeypatch: pytest.MonkeyPatch, bindings: types.ModuleType | None) -> None:
    """Whatever this host has, a missing NVML library or driver means no readings, and nothing fails."""
    monkeypatch.setitem(sys.modules, "pynvml", bindings)
    assert GpuMonitor().read() == []
