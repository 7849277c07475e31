// The llmserve console: plain JavaScript over the server's own API, no build step.
//
// The key (when the server has tenants) lives in this page's memory only, never in any storage, and goes
// out as a bearer token; the views shown are those the key may read: /v1/status answers the admin key
// only, so a tenant key sees the playground and its own usage.
"use strict";

const STATUS_EVERY_MS = 2000;
const USAGE_EVERY_MS = 5000;

const $ = (id) => document.getElementById(id);
const state = { key: null, admin: false, view: null, timer: null, refreshing: 0, generation: null };

// -- talking to the server ------------------------------------------------------------------------

class SignedOut extends Error {}

async function api(path, options = {}) {
  const headers = state.key ? { ...options.headers, Authorization: `Bearer ${state.key}` } : options.headers;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    // The key was revoked (or none was given): back to the prompt, with the server's reason.
    const message = await errorMessage(response);
    signOut(state.key ? message : "");
    throw new SignedOut(message);
  }
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// -- small DOM helpers ----------------------------------------------------------------------------

function cell(text, number = false) {
  const td = document.createElement("td");
  td.textContent = text;
  if (number) td.className = "number";
  return td;
}

function fillTable(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement("tr");
      tr.append(...cells);
      return tr;
    }),
  );
}

const seconds = (value) => (value == null ? "–" : `${Math.round(value * 1000)} ms`);
const integer = (value) => (value == null ? "–" : Math.round(value).toLocaleString("en"));

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

// -- signing in and choosing views --------------------------------------------------------------------

async function start() {
  notice("");
  try {
    const models = await api("/v1/models");
    if (!models.ok) return notice(await errorMessage(models));
    fillModels((await models.json()).data);
    state.admin = (await api("/v1/status")).ok;
  } catch (error) {
    if (!(error instanceof SignedOut)) notice(`The server did not answer: ${error}`);
    return;
  }
  $("sign-in").hidden = true;
  $("views").hidden = false;
  $("sign-out").hidden = !state.key;
  $("tab-status").hidden = !state.admin;
  const usageTitle = state.admin ? "Tenants and usage" : "Usage";
  $("tab-usage").textContent = $("usage-title").textContent = usageTitle;
  show(state.admin ? "status" : "playground");
}

function showSignIn(message = "") {
  $("views").hidden = true;
  $("sign-out").hidden = true;
  for (const view of ["status", "playground", "usage"]) $(view).hidden = true;
  $("sign-in").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

async function signIn(event) {
  event.preventDefault();
  state.key = $("key").value.trim();
  $("key").value = "";
  await start();
}

function signOut(message = "") {
  state.key = null;
  state.generation?.abort();
  stopRefresh();
  showSignIn(message);
}

const REFRESH = { status: [refreshStatus, STATUS_EVERY_MS], usage: [refreshUsage, USAGE_EVERY_MS] };

function show(view) {
  state.view = view;
  for (const name of ["status", "playground", "usage"]) {
    const tab = $(`tab-${name}`);
    tab.setAttribute("aria-selected", String(name === view));
    tab.tabIndex = name === view ? 0 : -1;
    $(name).hidden = name !== view;
  }
  stopRefresh();
  if (REFRESH[view]) refreshLoop(REFRESH[view], ++state.refreshing);
}

async function refreshLoop([refresh, everyMs], generation) {
  // One refresh at a time, the next one a period after it ends (a slow answer never overtakes a newer
  // one); paused while the tab is hidden; ended when the view changes.
  if (generation !== state.refreshing) return;
  if (document.visibilityState === "visible") {
    try {
      await refresh();
    } catch (error) {
      if (error instanceof SignedOut) return;
      notice(`The server did not answer (${error}); the figures shown are from the last answer.`);
    }
  }
  if (generation === state.refreshing) state.timer = setTimeout(() => refreshLoop([refresh, everyMs], generation), everyMs);
}

function stopRefresh() {
  state.refreshing++;
  clearTimeout(state.timer);
  state.timer = null;
}

function tabKeys(event) {
  // Arrow keys move between the visible tabs, as the ARIA tabs pattern has it.
  if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
  const tabs = [...document.querySelectorAll('[role="tab"]')].filter((tab) => !tab.hidden);
  const step = event.key === "ArrowRight" ? 1 : -1;
  const next = tabs[(tabs.indexOf(event.target) + step + tabs.length) % tabs.length];
  next.focus();
  show(next.getAttribute("aria-controls"));
}

// -- status ------------------------------------------------------------------------------------

async function refreshStatus() {
  const response = await api("/v1/status");
  if (!response.ok) return notice(await errorMessage(response));
  notice("");
  const status = await response.json();
  const minutes = status.window_seconds / 60;
  $("status-summary").textContent =
    `${status.workers} worker${status.workers === 1 ? "" : "s"}; tokens/s over the last ${status.rate_seconds} s, ` +
    `TTFT over the last ${minutes} minutes; refreshed every ${STATUS_EVERY_MS / 1000} s.` +
    (status.standby ? " In warm standby: the balancers send this instance no new requests until it is activated." : "");
  fillTable(
    $("models-table"),
    status.models.map((model) => [
      cell(model.id),
      cell(model.version ?? "–"),
      cell(modelState(model)),
      cell(`${model.slots_busy} / ${model.slots_total}`, true),
      cell(integer(model.queued), true),
      cell(model.tokens_per_second.toFixed(1), true),
      cell(seconds(model.ttft_p50_seconds), true),
      cell(seconds(model.ttft_p99_seconds), true),
    ]),
  );
  $("charts").replaceChildren(...status.models.map((model) => chart(model, status.bucket_seconds)));
  const aliases = status.aliases;
  $("aliases-table").hidden = aliases.length === 0;
  fillTable(
    $("aliases-table"),
    aliases.map((alias) => [
      cell(alias.id),
      cell(alias.stable),
      cell(alias.canary ?? "–"),
      cell(alias.canary ? `${alias.canary_weight}%` : "–", true),
    ]),
  );
}

function modelState(model) {
  const words = { ready: "warm", starting: "loading" };
  if (model.status !== "mixed") return words[model.status] ?? model.status;
  return Object.entries(model.workers)
    .map(([pid, state]) => `${words[state] ?? state} (worker ${pid})`)
    .join(", ");
}

const SVG = "http://www.w3.org/2000/svg";

function chart(model, bucketSeconds) {
  // Tokens/s (solid) and queue length (dashed), each scaled to its own peak, over the window.
  const { tokens_per_second: tokens, queued } = model.series;
  const figure = document.createElement("figure");
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const peakTokens = Math.max(...tokens, 0);
  const peakQueue = Math.max(...queued, 0);
  svg.setAttribute(
    "aria-label",
    `${model.id}: peak ${peakTokens.toFixed(1)} tokens/s and peak queue ${peakQueue} over ` +
      `${(tokens.length * bucketSeconds) / 60} minutes`,
  );
  svg.append(line(tokens, peakTokens, "line-tokens"), line(queued, peakQueue, "line-queue"));
  const caption = document.createElement("figcaption");
  caption.append(
    `${model.id}, last ${(tokens.length * bucketSeconds) / 60} minutes: `,
    legend("key-tokens", `tokens/s (peak ${peakTokens.toFixed(1)})`),
    ", ",
    legend("key-queue", `queued (peak ${peakQueue})`),
  );
  figure.append(svg, caption);
  return figure;
}

function line(values, peak, className) {
  const path = document.createElementNS(SVG, "polyline");
  const step = values.length > 1 ? 300 / (values.length - 1) : 0;
  const points = values.map((value, index) => `${(index * step).toFixed(1)},${(98 - (peak ? (value / peak) * 94 : 0)).toFixed(1)}`);
  path.setAttribute("points", points.join(" "));
  path.setAttribute("fill", "none");
  path.setAttribute("stroke-width", "2");
  path.setAttribute("vector-effect", "non-scaling-stroke");
  path.setAttribute("class", className);
  return path;
}

function legend(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

// -- playground ------------------------------------------------------------------------------------

function fillModels(models) {
  const select = $("play-model");
  const chosen = select.value;
  select.replaceChildren(
    ...models.map((model) => {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      return option;
    }),
  );
  if (models.some((model) => model.id === chosen)) select.value = chosen;
}

async function generate(event) {
  event.preventDefault();
  const chat = document.querySelector('input[name="play-endpoint"]:checked').value === "chat";
  const prompt = $("play-prompt").value;
  const body = {
    model: $("play-model").value,
    temperature: Number($("play-temperature").value),
    max_tokens: Number($("play-max-tokens").value),
    stream: true,
    stream_options: { include_usage: true },
    ...(chat ? { messages: [{ role: "user", content: prompt }] } : { prompt }),
  };
  const output = $("play-output");
  output.textContent = "";
  $("play-usage").textContent = "";
  const controller = new AbortController();
  state.generation = controller;
  setGenerating(true);
  try {
    const response = await api(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST",
      // Not resumable whatever the server's default: Stop must end the generation, not park it.
      headers: { "Content-Type": "application/json", "X-Stream-Resumable": "false" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      $("play-usage").textContent = await errorMessage(response);
      return;
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) {
        $("play-usage").textContent = chunk.error.message;
        return;
      }
      const choice = chunk.choices?.[0];
      if (choice) output.textContent += (chat ? choice.delta?.content : choice.text) ?? "";
      if (choice?.finish_reason) output.dataset.finishReason = choice.finish_reason;
      if (chunk.usage) {
        const { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total } = chunk.usage;
        $("play-usage").textContent = `Usage: ${prompt} prompt + ${completion} completion = ${total} tokens` +
          (output.dataset.finishReason ? ` (finish reason: ${output.dataset.finishReason})` : "");
      }
    });
  } catch (error) {
    if (error instanceof SignedOut) return;
    $("play-usage").textContent =
      error.name === "AbortError" ? "Stopped: the server cancels the generation and frees its slot." : String(error);
  } finally {
    delete output.dataset.finishReason;
    state.generation = null;
    setGenerating(false);
  }
}

async function readEvents(response, onChunk) {
  // Server-sent events: blank-line separated, "data: JSON" lines, ": comment" keep-alives, "[DONE]" last.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((text) => text.startsWith("data:"))
        .map((text) => text.slice(5).trimStart())
        .join("\n");
      if (data === "[DONE]") return;
      if (data) onChunk(JSON.parse(data));
    }
  }
}

function setGenerating(running) {
  $("play-send").disabled = running;
  $("play-stop").disabled = !running;
}

// -- tenants and usage ----------------------------------------------------------------------------------

async function refreshUsage() {
  const since = new Date();
  since.setUTCHours(0, 0, 0, 0);
  const [tenants, usage] = await Promise.all([
    api(state.admin ? "/v1/tenants" : "/v1/tenants/me"),
    api(`/v1/usage?start=${encodeURIComponent(since.toISOString())}`),
  ]);
  if (!tenants.ok) return notice(await errorMessage(tenants));
  notice("");
  const listed = state.admin ? (await tenants.json()).data : [await tenants.json()];
  const today = {};
  if (usage.ok) {
    for (const row of (await usage.json()).data) {
      const sum = (today[row.tenant] ??= { requests: 0, tokens: 0, cost: 0 });
      sum.requests += row.requests;
      sum.tokens += row.prompt_tokens + row.completion_tokens;
      sum.cost += row.cost;
    }
    $("usage-note").textContent = "";
  } else {
    $("usage-note").textContent = await errorMessage(usage);
  }
  fillTable(
    $("tenants-table"),
    listed.map((tenant) => {
      const used = today[tenant.id];
      return [
        cell(tenant.id),
        cell(integer(tenant.running), true),
        cell(integer(tenant.queued), true),
        cell(left(tenant.quota_remaining.requests), true),
        cell(left(tenant.quota_remaining.tokens), true),
        cell(integer(used?.requests ?? 0), true),
        cell(integer(used?.tokens ?? 0), true),
        cell((used?.cost ?? 0).toFixed(4), true),
      ];
    }),
  );
}

function left(quota) {
  return quota ? `${integer(quota.remaining)} of ${integer(quota.limit_per_minute)}` : "no limit";
}

// -- wiring ------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("play-form").addEventListener("submit", generate);
  $("play-stop").addEventListener("click", () => state.generation?.abort());
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => show(tab.getAttribute("aria-controls")));
    tab.addEventListener("keydown", tabKeys);
  }
  start();
});
