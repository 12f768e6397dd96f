// Live progress: a task's event stream, resumed after a dropped connection, and a pool that keeps
// a few streams open for the tasks on screen. A browser opens at most six HTTP/1.1 connections to
// one host, so the pool stays well under that and the console's other requests never queue.

import { ApiError } from "./api.js";

export const FINAL = new Set(["succeeded", "failed", "canceled"]);
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 15000;
const RETRIES = 6; // consecutive failed connections before giving up on a stream

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/**
 * Follows one task until its "end" event: onView(view) for "status" and "end" (both carry the task
 * view), onPage(data) for each finished page. Resumes with Last-Event-ID after a drop. Resolves with
 * the final view, or null when aborted, when the task is gone, or after RETRIES failed connections.
 */
export async function follow(api, taskId, { onView, onPage, signal }) {
  let lastEventId = null;
  let failures = 0;
  let delay = RETRY_FIRST_MS;
  while (!signal.aborted && failures < RETRIES) {
    try {
      for await (const event of api.events(taskId, { lastEventId, signal })) {
        if (event.id != null) lastEventId = event.id;
        failures = 0;
        delay = RETRY_FIRST_MS;
        const data = JSON.parse(event.data);
        if (event.event === "page") onPage(data);
        else if (event.event === "status") onView(data);
        else if (event.event === "end") {
          onView(data);
          return data;
        }
      }
    } catch (error) {
      if (signal.aborted) return null;
      if (error instanceof ApiError && error.status >= 400 && error.status < 500) return null;
    }
    failures += 1; // the stream ended before the task did (a restart, a proxy): connect again
    await sleep(delay, signal);
    delay = Math.min(delay * 2, RETRY_MAX_MS);
  }
  return null;
}

/**
 * Keeps streams open for the unfinished tasks among those source() returns: running ones first,
 * then queued ones, oldest first (they start first), at most `limit` at a time.
 */
export class FollowPool {
  constructor(api, limit, source, { onView, onPage }) {
    this.api = api;
    this.limit = limit;
    this.source = source;
    this.onView = onView;
    this.onPage = onPage;
    this.active = new Map(); // task id -> AbortController
    this.abandoned = new Set(); // streams that failed for good; the Refresh button shows their state
  }

  sync() {
    const wanted = this.source()
      .filter((view) => !FINAL.has(view.status) && !this.abandoned.has(view.task_id))
      .sort((a, b) => rank(a) - rank(b) || a.created_at.localeCompare(b.created_at));
    const ids = new Set(wanted.map((view) => view.task_id));
    for (const [taskId, controller] of this.active) {
      if (!ids.has(taskId)) {
        controller.abort();
        this.active.delete(taskId);
      }
    }
    for (const view of wanted) {
      if (this.active.size >= this.limit) break;
      if (!this.active.has(view.task_id)) this.start(view.task_id);
    }
  }

  start(taskId) {
    const controller = new AbortController();
    this.active.set(taskId, controller);
    follow(this.api, taskId, {
      signal: controller.signal,
      onView: (view) => this.onView(view),
      onPage: (data) => this.onPage(taskId, data),
    }).then((end) => {
      if (this.active.get(taskId) !== controller) return; // stopped by sync() or stopAll()
      this.active.delete(taskId);
      if (end === null) this.abandoned.add(taskId);
      this.sync(); // a slot is free: the next unfinished task gets it
    });
  }

  stopAll() {
    for (const controller of this.active.values()) controller.abort();
    this.active.clear();
    this.abandoned.clear();
  }
}

function rank(view) {
  return view.status === "running" ? 0 : 1;
}
