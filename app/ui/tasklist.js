// The task list: newest first, a page at a time, each unfinished task's progress live.

import { FINAL, FollowPool } from "./follow.js";
import { fill, h } from "./dom.js";
import { duration, pagesPerSecond, runSeconds, when } from "./format.js";

const PAGE_SIZE = 20;
const STREAMS = 3; // live streams for the list; the open task's view has one more

export class TaskList {
  /** notify(message) shows a message to the person; errors from the API are passed to it. */
  constructor(api, notify) {
    this.api = api;
    this.notify = notify;
    this.list = document.getElementById("task-list");
    this.empty = document.getElementById("tasks-empty");
    this.newer = document.getElementById("newer");
    this.older = document.getElementById("older");
    this.rows = new Map(); // task id -> Row, in display order
    this.cursors = [null]; // the cursor of each page shown so far; the last is the current page's
    this.nextCursor = null;
    this.pool = new FollowPool(api, STREAMS, () => [...this.rows.values()].map((row) => row.view), {
      onView: (view) => this.update(view),
      onPage: (taskId, data) => this.rows.get(taskId)?.progress(data),
    });
    document.getElementById("refresh").addEventListener("click", () => this.load());
    this.newer.addEventListener("click", () => {
      this.cursors.pop();
      this.load();
    });
    this.older.addEventListener("click", () => {
      this.cursors.push(this.nextCursor);
      this.load();
    });
  }

  /** (Re)load the current page of tasks and follow its unfinished ones. */
  async load() {
    let page;
    try {
      page = await this.api.listTasks(PAGE_SIZE, this.cursors.at(-1));
    } catch (error) {
      this.notify(`Could not list the tasks: ${error.message}`);
      return;
    }
    this.pool.stopAll();
    this.rows.clear();
    this.nextCursor = page.next_cursor;
    fill(this.list, page.tasks.map((view) => this.row(view).node));
    this.controls();
    this.pool.sync();
  }

  stop() {
    this.pool.stopAll();
  }

  /** A task just created: shown at the top when the newest page is on screen. */
  add(view) {
    if (this.cursors.length > 1 || this.rows.has(view.task_id)) return;
    if (this.rows.size >= PAGE_SIZE) {
      this.load(); // a row moves to the next page, whose cursor only the service can tell
      return;
    }
    this.list.prepend(this.row(view).node);
    this.controls();
    this.pool.sync();
  }

  update(view) {
    const row = this.rows.get(view.task_id);
    if (!row) return;
    row.update(view);
    if (FINAL.has(view.status)) this.pool.sync();
  }

  row(view) {
    const row = new Row(view, (taskId) => this.cancel(taskId));
    this.rows.set(view.task_id, row);
    return row;
  }

  async cancel(taskId) {
    try {
      this.update(await this.api.cancelTask(taskId));
    } catch (error) {
      this.notify(`Could not cancel: ${error.message}`);
    }
  }

  controls() {
    this.empty.hidden = this.rows.size > 0;
    this.newer.disabled = this.cursors.length <= 1;
    this.older.disabled = !this.nextCursor;
    this.newer.parentElement.hidden = this.newer.disabled && this.older.disabled;
  }
}

/** One task's row; updated in place so focus and hover survive progress updates. */
class Row {
  constructor(view, onCancel) {
    const id = view.task_id;
    this.name = h("a", { className: "task__name", href: `#/tasks/${encodeURIComponent(id)}` });
    this.badge = h("span", { className: "badge" });
    this.bar = h("progress", { className: "task__bar", max: 1, value: 0 });
    this.count = h("span", { className: "task__count" });
    this.meta = h("p", { className: "task__meta" });
    this.error = h("p", { className: "task__error", attrs: { role: "note" } });
    this.cancelButton = h("button", { type: "button", className: "button--quiet", onclick: () => onCancel(id) }, "Cancel");
    this.node = h(
      "li",
      { className: "task", dataset: { taskId: id } },
      h("div", { className: "task__head" }, this.name, this.badge),
      h("div", { className: "task__progress" }, this.bar, this.count),
      this.meta,
      this.error,
      h("div", { className: "task__actions" }, this.cancelButton),
    );
    this.update(view);
  }

  update(view) {
    this.view = view;
    this.name.textContent = view.source?.filename || view.source?.url || view.task_id;
    this.name.title = view.source?.url || view.source?.filename || "";
    this.badge.textContent = view.status;
    this.badge.className = `badge badge--${view.status}`;
    this.node.dataset.status = view.status;
    this.showProgress(view.progress.pages_done, view.progress.pages_total);
    const parts = [when(view.created_at)];
    if (view.started_at) parts.push(duration(runSeconds(view)));
    const rate = pagesPerSecond(view);
    if (rate) parts.push(rate);
    if (view.status === "queued" && view.queue_position) parts.push(`#${view.queue_position} in queue`);
    if (view.waiting_reason) parts.push(view.waiting_reason);
    if (view.truncated_pages?.length) parts.push(`${view.truncated_pages.length} truncated page(s)`);
    if (view.suspect_pages) parts.push(`${view.suspect_pages} suspect page(s)`);
    this.meta.textContent = parts.filter(Boolean).join(" · ");
    this.error.textContent = view.error ? `${view.error.code}: ${view.error.message}` : "";
    this.error.hidden = !view.error;
    this.cancelButton.hidden = FINAL.has(view.status);
  }

  /** A "page" event: a page is done. */
  progress(data) {
    this.view = {
      ...this.view,
      status: "running",
      progress: { pages_done: data.pages_done, pages_total: data.pages_total },
    };
    this.update(this.view);
  }

  showProgress(done, total) {
    this.bar.max = Math.max(total, 1);
    this.bar.value = done;
    this.count.textContent = `${done}/${total} pages`;
    this.bar.setAttribute("aria-label", `${done} of ${total} pages done`);
  }
}
