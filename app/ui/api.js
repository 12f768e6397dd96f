// The service's HTTP API as the console uses it. The API key lives in sessionStorage (this tab,
// until it closes) and travels only in the Authorization header: never in a URL, never in a cookie.

import { readEvents } from "./sse.js";

const KEY_ITEM = "dsocr.apiKey";

/** An error answer of the API: its HTTP status and the {"error": {code, message}} body. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

async function errorOf(response) {
  let code = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code ?? code);
      message = String(body.error.message ?? message);
    }
  } catch {
    // not the API's JSON error body (a proxy's page, say): the status line says enough
  }
  return new ApiError(response.status, code, message);
}

/** A client of the API with one key ("" when the service has no keys). */
export class Api {
  constructor(key) {
    this.key = key;
  }

  /** fetch() with the key; resolves to the Response when it is 2xx, else rejects with an ApiError. */
  async request(path, { method = "GET", body, headers = {}, signal, cache = "no-store" } = {}) {
    const all = { ...headers };
    if (this.key) all.Authorization = `Bearer ${this.key}`;
    const response = await fetch(path, { method, body, headers: all, signal, cache });
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async json(path, options = {}) {
    return (await this.request(path, options)).json();
  }

  async sendJson(path, method, value) {
    return this.json(path, {
      method,
      body: JSON.stringify(value),
      headers: { "Content-Type": "application/json" },
    });
  }

  async blob(path, options = {}) {
    return (await this.request(path, options)).blob();
  }

  /** Resolves when the key is accepted; rejects with an ApiError (401) when it is not. */
  async check() {
    await this.request("/v1/tasks?limit=1");
  }

  listTasks(limit, cursor) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (cursor) query.set("cursor", cursor);
    return this.json(`/v1/tasks?${query}`);
  }

  /** Usage per day from `from` to `to` (YYYY-MM-DD): the key's tenant, or every tenant for an admin. */
  usage({ from, to }) {
    return this.json(`/v1/usage?${new URLSearchParams({ from, to })}`);
  }

  readTask(taskId) {
    return this.json(taskPath(taskId));
  }

  cancelTask(taskId) {
    return this.json(taskPath(taskId), { method: "DELETE" });
  }

  upload(file, fields) {
    const form = new FormData();
    form.append("file", file, file.name);
    for (const [name, value] of Object.entries(fields)) {
      if (value !== "" && value != null) form.append(name, String(value));
    }
    return this.json("/v1/tasks/upload", { method: "POST", body: form });
  }

  createFromUrl(url, options) {
    return this.sendJson("/v1/tasks", "POST", { url, options });
  }

  renderedPage(taskId, page) {
    return this.json(`${taskPath(taskId)}/pages/${Number(page)}/rendered`);
  }

  // Images may come from the browser's cache, as the service allows: they do not change.
  pageImage(taskId, page, signal) {
    return this.blob(`${taskPath(taskId)}/pages/${Number(page)}`, { signal, cache: "default" });
  }

  // redirect=false: a service that sends downloads to its bucket (APP_S3_REDIRECT_DOWNLOADS) streams
  // them to the console instead, whose Content-Security-Policy allows fetches from its own origin only.
  figure(taskId, name, signal) {
    const path = `${taskPath(taskId)}/images/${encodeURIComponent(name)}?redirect=false`;
    return this.blob(path, { signal, cache: "default" });
  }

  // The whole result, for the pages' quality; streamed here, as downloads are (see figure()).
  resultJson(taskId, signal) {
    return this.json(`${taskPath(taskId)}/result.json?redirect=false`, { signal });
  }

  download(path) {
    return this.blob(`${path}?redirect=false`);
  }

  /**
   * The task's Server-Sent Events, in order, until the stream ends; resumes after lastEventId.
   * Ends at once when the server answers 204 (nothing more will come).
   */
  async *events(taskId, { lastEventId, signal } = {}) {
    const headers = { Accept: "text/event-stream" };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const response = await this.request(`${taskPath(taskId)}/events`, { headers, signal });
    if (response.status === 204 || !response.body) return;
    yield* readEvents(response.body);
  }
}

export function taskPath(taskId) {
  return `/v1/tasks/${encodeURIComponent(taskId)}`;
}
