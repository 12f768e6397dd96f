// One task: its state (live while it runs), downloads, and its pages with boxes and Markdown.

import { FINAL, follow } from "./follow.js";
import { FigureCache, saveBlob } from "./downloads.js";
import { fill, h } from "./dom.js";
import { bytes, duration, pagesPerSecond, runSeconds, stem, when } from "./format.js";
import { PageView } from "./pageview.js";

const DOWNLOADS = [
  // [link in the task view, label, file name suffix]
  ["markdown", "result.md", ".md"],
  ["json", "result.json", ".json"],
  ["layout", "layout.json", ".layout.json"],
  ["zip", "result.zip", ".zip"],
  ["chunks", "chunks.json", ".chunks.json"],
  ["html", "result.html", ".html"],
  ["docx", "result.docx", ".docx"],
];

export class TaskView {
  constructor(api, root, notify) {
    this.api = api;
    this.root = root;
    this.notify = notify;
    this.controller = new AbortController();
    this.pageView = null;
    this.figures = null;
  }

  /** Show task `taskId` at page `page` (its first when null). */
  async open(taskId, page) {
    this.close();
    this.controller = new AbortController();
    const { signal } = this.controller;
    this.taskId = taskId;
    this.figures = new FigureCache(this.api, taskId);
    this.build();
    let view;
    try {
      view = await this.api.readTask(taskId);
    } catch (error) {
      this.el.error.hidden = false;
      this.el.error.textContent = `Could not open this task: ${error.message}`;
      return;
    }
    if (signal.aborted) return;
    this.update(view);
    if (view.status === "succeeded") {
      await this.showResult(view, page);
      return;
    }
    if (FINAL.has(view.status)) return;
    const end = await follow(this.api, taskId, {
      signal,
      onView: (next) => this.update(next),
      onPage: ({ pages_done, pages_total }) =>
        this.update({ ...this.view, status: "running", progress: { pages_done, pages_total } }),
    });
    if (end?.status === "succeeded" && !signal.aborted) await this.showResult(end, page);
  }

  close() {
    this.controller.abort();
    this.pageView?.destroy();
    this.pageView = null;
    this.figures?.release();
    this.figures = null;
  }

  build() {
    const el = {
      title: h("h1", { className: "task-view__title" }),
      badge: h("span", { className: "badge" }),
      bar: h("progress", { max: 1, value: 0 }),
      count: h("span", { className: "task__count" }),
      summary: h("p", { className: "task__meta" }),
      error: h("p", { className: "error", attrs: { role: "alert" }, hidden: true }),
      cancel: h("button", { type: "button", className: "button--quiet", onclick: () => this.cancel() }, "Cancel"),
      downloads: h("div", { className: "downloads", attrs: { role: "group", "aria-label": "Downloads" } }),
      result: h("div", { className: "result", hidden: true }),
    };
    this.el = el;
    fill(
      this.root,
      h("a", { className: "back", href: "#/" }, "← All tasks"),
      h(
        "div",
        { className: "task-view__head" },
        h("div", { className: "task-view__name" }, el.title, el.badge),
        h("div", { className: "task__progress" }, el.bar, el.count),
        el.summary,
        h("div", { className: "task-view__actions" }, el.cancel, el.downloads),
      ),
      el.error,
      el.result,
    );
  }

  update(view) {
    this.view = view;
    const { el } = this;
    el.title.textContent = view.source?.filename || view.source?.url || view.task_id;
    el.badge.textContent = view.status;
    el.badge.className = `badge badge--${view.status}`;
    const { pages_done: done, pages_total: total } = view.progress;
    el.bar.max = Math.max(total, 1);
    el.bar.value = done;
    el.bar.setAttribute("aria-label", `${done} of ${total} pages done`);
    el.count.textContent = `${done}/${total} pages`;
    const parts = [
      `created ${when(view.created_at)}`,
      view.source?.size_bytes != null ? bytes(view.source.size_bytes) : "",
      view.started_at ? duration(runSeconds(view)) : "",
      pagesPerSecond(view),
    ];
    el.summary.textContent = parts.filter(Boolean).join(" · ");
    el.summary.title = view.model ? `model: ${view.model}` : "";
    el.error.hidden = !view.error;
    el.error.textContent = view.error ? `${view.error.code}: ${view.error.message}` : "";
    el.cancel.hidden = FINAL.has(view.status);
    fill(
      el.downloads,
      DOWNLOADS.filter(([link]) => view.links?.[link]).map(([link, label, suffix]) =>
        h("button", { type: "button", onclick: () => this.download(view.links[link], suffix) }, label),
      ),
    );
  }

  async cancel() {
    try {
      this.update(await this.api.cancelTask(this.taskId));
    } catch (error) {
      this.notify(`Could not cancel: ${error.message}`);
    }
  }

  async download(path, suffix) {
    const name = stem(this.view.source?.filename, this.taskId) + suffix;
    try {
      saveBlob(await this.api.download(path), name);
    } catch (error) {
      this.notify(`Could not download ${name}: ${error.message}`);
    }
  }

  async showResult(view, page) {
    const pages = view.pages;
    const truncated = new Set(view.truncated_pages);
    const select = h(
      "select",
      { id: "page-select", onchange: () => this.showPage(Number(select.value)) },
      pages.map((number) =>
        h("option", { value: number }, `Page ${number}${truncated.has(number) ? " ⚠ truncated" : ""}`),
      ),
    );
    const previous = h("button", { type: "button", onclick: () => this.step(-1) }, "‹ Previous");
    const next = h("button", { type: "button", onclick: () => this.step(1) }, "Next ›");
    const panes = {
      legend: h("ul", { className: "legend", attrs: { "aria-label": "Block types" } }),
      stage: h("div", { className: "stage" }),
      rendered: h("div", { className: "rendered" }),
      raw: h("pre", { className: "raw" }),
      notice: h("p", { className: "notice", attrs: { role: "note" }, hidden: true }),
    };
    this.pager = { select, previous, next, pages };
    fill(
      this.el.result,
      h(
        "nav",
        { className: "pagebar", attrs: { "aria-label": "Pages" } },
        previous,
        h("label", { className: "visually-hidden", htmlFor: "page-select" }, "Page"),
        select,
        next,
        h("span", { className: "muted" }, `${pages.length} page(s)`),
      ),
      panes.notice,
      panes.legend,
      h(
        "div",
        { className: "panes" },
        h("section", { className: "pane pane--page", attrs: { "aria-label": "Page image and blocks" } }, panes.stage),
        h(
          "section",
          { className: "pane pane--rendered", attrs: { "aria-labelledby": "rendered-title" } },
          h("h3", { id: "rendered-title" }, "Rendered"),
          panes.rendered,
        ),
        h(
          "section",
          { className: "pane pane--raw", attrs: { "aria-labelledby": "raw-title" } },
          h("h3", { id: "raw-title" }, "Markdown"),
          panes.raw,
        ),
      ),
      this.figureGallery(view),
    );
    this.el.result.hidden = false;
    this.pageView = new PageView(this.api, this.taskId, this.figures, panes);
    const first = pages.includes(page) ? page : pages[0];
    if (first != null) await this.showPage(first);
  }

  async showPage(number) {
    const { select, previous, next, pages } = this.pager;
    const at = pages.indexOf(number);
    select.value = String(number);
    previous.disabled = at <= 0;
    next.disabled = at >= pages.length - 1;
    // Reloading the console comes back to this page; replaceState adds no history entry per page.
    history.replaceState(null, "", `#/tasks/${encodeURIComponent(this.taskId)}/${number}`);
    try {
      await this.pageView.show(number);
    } catch (error) {
      this.notify(`Could not show page ${number}: ${error.message}`);
    }
  }

  step(delta) {
    const { pages, select } = this.pager;
    const at = pages.indexOf(Number(select.value)) + delta;
    if (at >= 0 && at < pages.length) this.showPage(pages[at]);
  }

  /** Every cropped figure of the task, each fetched when it scrolls into view. */
  figureGallery(view) {
    const names = (view.links?.images ?? []).map((link) => decodeURIComponent(link.split("/").pop()));
    if (!names.length) return null;
    const { signal } = this.controller;
    const observer = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        if (!entry.isIntersecting) continue;
        observer.unobserve(entry.target);
        const image = entry.target;
        this.figures?.url(image.dataset.name).then(
          (url) => {
            image.src = url;
          },
          () => {},
        );
      }
    });
    signal.addEventListener("abort", () => observer.disconnect(), { once: true });
    const items = names.map((name) => {
      const image = h("img", { className: "figures__image", alt: `Figure ${name}`, dataset: { name } });
      observer.observe(image);
      const page = Number(/^p(\d{4})_/.exec(name)?.[1]);
      return h(
        "li",
        {},
        image,
        h(
          "button",
          { type: "button", className: "button--quiet", onclick: () => view.pages.includes(page) && this.showPage(page) },
          `${name}${page ? ` · page ${page}` : ""}`,
        ),
      );
    });
    return h(
      "section",
      { className: "figures", attrs: { "aria-labelledby": "figures-title" } },
      h("h3", { id: "figures-title" }, `Figures (${names.length})`),
      h("ul", { className: "figures__list" }, items),
    );
  }
}
