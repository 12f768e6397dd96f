// One task: its state (live while it runs), downloads, and its pages with boxes and Markdown, each
// marked with how far to trust it (quality.js) and a filter for the suspect ones.

import { FINAL, follow } from "./follow.js";
import { FigureCache, saveBlob } from "./downloads.js";
import { fill, h } from "./dom.js";
import { bytes, duration, pagesPerSecond, runSeconds, stem, when } from "./format.js";
import { PageView } from "./pageview.js";
import { optionText, qualityByPage, qualityNote } from "./quality.js";

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
      view.suspect_pages ? `${view.suspect_pages} suspect page(s)` : "",
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
    const select = h("select", { id: "page-select", onchange: () => this.showPage(Number(select.value)) });
    const previous = h("button", { type: "button", onclick: () => this.step(-1) }, "‹ Previous");
    const next = h("button", { type: "button", onclick: () => this.step(1) }, "Next ›");
    const suspectOnly = h("input", { type: "checkbox", id: "suspect-only", onchange: () => this.filterPages() });
    const filter = h("label", { className: "pagebar__filter", htmlFor: "suspect-only", hidden: true }, suspectOnly);
    const count = h("span", { className: "muted" });
    // `pages` are the picker's pages (all, or the suspect ones); `all` every page of the result.
    this.pager = { select, previous, next, suspectOnly, filter, count, pages: view.pages, all: view.pages };
    this.pager.truncated = new Set(view.truncated_pages);
    this.pager.quality = null; // page number -> quality, once result.json is read
    this.qualitySlot = h("div", { className: "quality-slot" });
    this.fillPicker();
    const panes = {
      legend: h("ul", { className: "legend", attrs: { "aria-label": "Block types" } }),
      stage: h("div", { className: "stage" }),
      rendered: h("div", { className: "rendered" }),
      raw: h("pre", { className: "raw" }),
      notice: h("p", { className: "notice", attrs: { role: "note" }, hidden: true }),
    };
    fill(
      this.el.result,
      h(
        "nav",
        { className: "pagebar", attrs: { "aria-label": "Pages" } },
        previous,
        h("label", { className: "visually-hidden", htmlFor: "page-select" }, "Page"),
        select,
        next,
        count,
        filter,
      ),
      this.qualitySlot,
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
    const pages = view.pages;
    const first = pages.includes(page) ? page : pages[0];
    // Servers older than the quality signal have no suspect_pages and no quality to read.
    const quality = view.suspect_pages == null ? null : this.loadQuality();
    if (first != null) await this.showPage(first);
    await quality;
  }

  /** Read the pages' quality from result.json, then mark the picker and the page on screen. */
  async loadQuality() {
    const { signal } = this.controller;
    let result;
    try {
      result = await this.api.resultJson(this.taskId, signal);
    } catch (error) {
      if (!signal.aborted) this.notify(`Could not read the pages' quality: ${error.message}`);
      return;
    }
    const quality = qualityByPage(result);
    if (signal.aborted || !quality) return;
    const { pager } = this;
    pager.quality = quality;
    const suspect = pager.all.filter((number) => quality.get(number)?.suspect).length;
    fill(pager.filter, pager.suspectOnly, ` Suspect pages only (${suspect})`);
    pager.suspectOnly.disabled = suspect === 0;
    pager.filter.hidden = false;
    this.fillPicker();
    this.showQuality(Number(pager.select.value));
  }

  /** (Re)fill the picker with every page, or only the suspect ones, keeping the page shown. */
  fillPicker() {
    const { select, all, truncated, quality, suspectOnly, count } = this.pager;
    const shown = select.value;
    const suspect = all.filter((number) => quality?.get(number)?.suspect);
    this.pager.pages = suspectOnly.checked ? suspect : all;
    fill(
      select,
      this.pager.pages.map((number) =>
        h("option", { value: number }, optionText(number, quality?.get(number), truncated.has(number))),
      ),
    );
    if (this.pager.pages.includes(Number(shown))) select.value = shown;
    count.textContent = suspectOnly.checked ? `${suspect.length} of ${all.length} page(s)` : `${all.length} page(s)`;
  }

  /** The filter was switched: stay on the page shown if the picker still has it, else go to its first. */
  filterPages() {
    const shown = Number(this.pager.select.value);
    this.fillPicker();
    const { pages } = this.pager;
    if (pages.length) this.showPage(pages.includes(shown) ? shown : pages[0]);
  }

  showQuality(number) {
    fill(this.qualitySlot, qualityNote(this.pager.quality?.get(number)));
  }

  async showPage(number) {
    if (!this.pager.pages.includes(number) && this.pager.suspectOnly.checked) {
      this.pager.suspectOnly.checked = false; // a figure's button asked for a page the filter hides
      this.fillPicker();
    }
    const { select, previous, next, pages } = this.pager;
    const at = pages.indexOf(number);
    select.value = String(number);
    previous.disabled = at <= 0;
    next.disabled = at >= pages.length - 1;
    this.showQuality(number);
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
