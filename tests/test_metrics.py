"""The /metrics endpoint in a single process (the multi-worker view is tested with a real server)."""

from flask.testing import FlaskClient

from llmserve.api.runner import Usage
from llmserve.engine.stats import EngineStats
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


def test_requests_and_engine_state_reach_the_llm_metrics(client: FlaskClient) -> None:
    metrics: LLMMetrics = client.application.extensions[EXTENSION]
    metrics.record_request(MODEL, Usage(prompt_tokens=7, completion_tokens=3), 10.0, 10.2, 11.0)
    metrics.publish_engine(MODEL, EngineStats(slots_total=8, slots_busy=2, queued=1, kv_cells_used=40))
    text = scrape(client)
    assert f'llmserve_prompt_tokens_total{{model="{MODEL}"}} 7.0' in text
    assert f'llmserve_generation_tokens_total{{model="{MODEL}"}} 3.0' in text
    assert f'llmserve_time_to_first_token_seconds_bucket{{le="0.25",model="{MODEL}"}} 1.0' in text
    assert f'llmserve_slots_busy{{model="{MODEL}"}} 2.0' in text
    assert f'llmserve_requests_waiting{{model="{MODEL}"}} 1.0' in text
