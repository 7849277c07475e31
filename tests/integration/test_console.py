"""The console in a real browser (the distribution's Chromium, driven by Playwright) against real servers:
the status view, a streamed playground reply and its stop button, and what each key may see.

Each view's screenshot is kept as a test artefact in ``$LLMSERVE_TEST_ARTIFACTS/console`` (by default
``.artifacts/console`` in the checkout); ``docs/console.md`` shows one of each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import missing_service
from tests.integration.conftest import (
    LLMSERVE,
    MODEL,
    Server,
    cli_env,
    create_key,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.slow

ARTIFACTS = Path(os.environ.get("LLMSERVE_TEST_ARTIFACTS", Path(__file__).parents[2] / ".artifacts")) / "console"
WAIT_MS = 60_000  # for the model's answers; the page's own work takes milliseconds
SMOLLM2 = "smollm2-135m-instruct"
TENANTS = """
[tenants.alpha]
requests_per_minute = 50

[tenants.beta]
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        missing_service("Chromium is not installed")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    yield opened
    context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def slots_of(server: Server, model: str) -> int:
    return int(server.engine_stats(model)["slots_total"])


def _open_playground(page: Page, server: Server, *, model: str, endpoint: str, prompt: str, max_tokens: int) -> None:
    page.goto(server.url)
    page.get_by_role("tab", name="Playground").click()
    page.get_by_label("Model").select_option(model)
    page.get_by_label(endpoint, exact=True).check()
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Prompt").fill(prompt)


def test_a_playground_reply_streams_into_the_page_with_its_usage(server: Server, page: Page) -> None:
    _open_playground(
        page, server, model=SMOLLM2, endpoint="Chat", prompt="Write a short poem about the sea.", max_tokens=48
    )
    # Count the reply's changes: a streamed reply arrives in many pieces, a buffered one in one.
    page.evaluate(
        """() => {
            window.replyChanges = 0;
            new MutationObserver(() => window.replyChanges++).observe(
                document.getElementById('play-output'), {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#play-usage")).to_contain_text("Usage:")
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    assert page.locator("#play-output").inner_text().strip()
    assert page.evaluate("window.replyChanges") > 5
    usage = page.locator("#play-usage").inner_text()
    assert "completion" in usage and "finish reason" in usage
    screenshot(page, "playground")


def test_the_stop_button_cancels_the_generation_and_frees_its_slot(server: Server, page: Page) -> None:
    before = server.engine_stats()["cancelled"]
    # Greedy counting goes on until max_tokens: the reply is still running when Stop is pressed.
    _open_playground(page, server, model=MODEL, endpoint="Completion", prompt="1, 2, 3, 4, 5, 6,", max_tokens=2000)
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#play-output")).not_to_be_empty()
    assert wait_for(lambda: server.engine_stats()["slots_busy"] == 1, timeout=30)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#play-usage")).to_contain_text("Stopped")
    assert wait_for(lambda: server.engine_stats()["slots_busy"] == 0, timeout=30)
    assert server.engine_stats()["cancelled"] == before + 1
    assert page.get_by_role("button", name="Send").is_enabled()


def test_the_status_view_shows_the_embedded_models_their_slots_and_live_activity(server: Server, page: Page) -> None:
    reply = httpx.post(
        f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 16}, timeout=60
    )
    assert reply.status_code == 200
    page.goto(server.url)
    expect(page.get_by_role("tab", name="Status")).to_have_attribute("aria-selected", "true")
    rows = page.locator("#models-table tbody tr")
    for model in (MODEL, SMOLLM2):
        row = rows.filter(has=page.get_by_role("cell", name=model, exact=True))
        expect(row).to_have_count(1)
        expect(row.get_by_role("cell", name=f"0 / {slots_of(server, model)}", exact=True)).to_be_visible()
        expect(row.get_by_role("cell", name="warm", exact=True)).to_be_visible()
    expect(page.locator("#charts figure")).to_have_count(2)
    # The request above shows up as the refreshes come: its time to first token, and its tokens in the chart.
    gemma = rows.filter(has=page.get_by_role("cell", name=MODEL, exact=True))
    expect(gemma.locator("td").nth(6)).to_have_text(re.compile(r"^\d+ ms$"))
    expect(page.locator("#charts figure").filter(has_text=MODEL)).not_to_contain_text("tokens/s (peak 0.0)")
    screenshot(page, "status")


def test_the_layout_fits_a_narrow_window_and_every_control_is_labelled(server: Server, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740})
    narrow = context.new_page()
    try:
        narrow.goto(server.url)
        expect(narrow.locator("#models-table tbody tr")).to_have_count(2)
        for view in ("Status", "Playground", "Tenants and usage"):
            narrow.get_by_role("tab", name=view).click()
            assert narrow.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), view
        unlabelled = narrow.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button')]
                .filter((el) => !(el.labels?.length || el.getAttribute('aria-label') || el.textContent.trim()))
                .map((el) => el.id)"""
        )
        assert unlabelled == []
        narrow.get_by_role("tab", name="Playground").focus()  # the arrow keys move between the tabs
        narrow.keyboard.press("ArrowRight")
        expect(narrow.get_by_role("tab", name="Tenants and usage")).to_be_focused()
        expect(narrow.locator("#usage")).to_be_visible()
    finally:
        context.close()


@pytest.fixture(scope="module")
def tenant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-tenants")


@pytest.fixture(scope="module")
def tenant_server(tenant_dir: Path) -> Iterator[Server]:
    running = start_server(tenant_dir, config=TENANTS, model__embedded=MODEL)
    yield running
    stop_server(running)


def _admin_key(directory: Path) -> str:
    command = [LLMSERVE, "keys", "create", "--config", str(directory / "llmserve.toml"), "--admin"]
    return subprocess.run(command, capture_output=True, text=True, check=True, env=cli_env(directory)).stdout.strip()


def _sign_in(page: Page, server: Server, key: str) -> None:
    page.goto(server.url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def test_without_a_key_the_console_shows_only_the_key_prompt(tenant_server: Server, page: Page) -> None:
    page.goto(tenant_server.url)
    expect(page.get_by_label("API key")).to_be_visible()
    for view in ("#status", "#playground", "#usage", "#views"):
        expect(page.locator(view)).to_be_hidden()
    page.get_by_label("API key").fill("sk-llmserve-0000-wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#key-error")).to_contain_text("Incorrect API key")
    expect(page.locator("#playground")).to_be_hidden()
    screenshot(page, "sign-in")


def test_a_tenant_key_sees_its_own_usage_and_the_admin_key_every_tenant(
    tenant_server: Server, tenant_dir: Path, browser: Browser
) -> None:
    keys = {name: create_key(tenant_dir, name) for name in ("alpha", "beta")}
    for name, key in keys.items():
        reply = httpx.post(
            f"{tenant_server.url}/v1/completions",
            json={"model": MODEL, "prompt": f"Hello from {name}", "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert reply.status_code == 200
    admin = _admin_key(tenant_dir)
    assert wait_for(lambda: len(_usage_rows(tenant_server, admin)) == 2, timeout=30)  # the ledger's batched writes

    tenant_view = browser.new_context().new_page()
    tenant_view.set_default_timeout(WAIT_MS)
    _sign_in(tenant_view, tenant_server, keys["alpha"])
    expect(tenant_view.get_by_role("tab", name="Playground")).to_have_attribute("aria-selected", "true")
    expect(tenant_view.get_by_role("tab", name="Status")).to_be_hidden()
    tenant_view.get_by_role("tab", name="Usage").click()
    expect(tenant_view.get_by_role("heading", name="Usage", exact=True)).to_be_visible()
    rows = tenant_view.locator("#tenants-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first.locator("td").first).to_have_text("alpha")
    # Requests left this minute: 49, or 50 should the quota's minute have turned since the request.
    expect(rows.first.locator("td").nth(3)).to_have_text(re.compile(r"^(49|50) of 50$"))
    expect(rows.first.locator("td").nth(5)).to_have_text("1")  # requests today
    assert "beta" not in tenant_view.locator("main").inner_text()
    # The key lives in the page only: in no storage, and gone with a reload.
    assert tenant_view.evaluate("sessionStorage.length + localStorage.length") == 0
    assert tenant_view.context.cookies() == []
    tenant_view.reload()
    expect(tenant_view.get_by_label("API key")).to_be_visible()
    tenant_view.context.close()

    admin_view = browser.new_context().new_page()
    admin_view.set_default_timeout(WAIT_MS)
    _sign_in(admin_view, tenant_server, admin)
    expect(admin_view.get_by_role("tab", name="Status")).to_have_attribute("aria-selected", "true")
    expect(admin_view.locator("#models-table tbody tr")).to_have_count(1)
    admin_view.get_by_role("tab", name="Tenants and usage").click()
    expect(admin_view.locator("#tenants-table tbody tr")).to_have_count(2)
    for name in ("alpha", "beta"):
        row = admin_view.locator("#tenants-table tbody tr").filter(has_text=name)
        expect(row.locator("td").nth(5)).to_have_text("1")
    screenshot(admin_view, "tenants")
    admin_view.get_by_role("button", name="Forget key").click()
    expect(admin_view.get_by_label("API key")).to_be_visible()
    expect(admin_view.locator("#usage")).to_be_hidden()
    admin_view.context.close()


def _usage_rows(server: Server, admin: str) -> list[dict[str, object]]:
    response = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
    return list(response.json()["data"]) if response.status_code == 200 else []
