// One result page: the page image with every layout block's box over it, the blocks rendered, and
// the page's Markdown source, side by side. A box and its block are tied by the block's index:
// pointing at, focusing or clicking either one highlights both.

import { h, fill } from "./dom.js";

// A colour per block type the model knows; other labels get one from a hash of their name.
const TYPE_COLORS = {
  title: "#c92a2a",
  sub_title: "#e8590c",
  text: "#1c7ed6",
  table: "#2b8a3e",
  table_caption: "#5c940d",
  table_footnote: "#82c91e",
  equation: "#9c36b5",
  image: "#d6336c",
  image_caption: "#f783ac",
};

export function typeColor(type) {
  if (Object.hasOwn(TYPE_COLORS, type)) return TYPE_COLORS[type];
  let hash = 0;
  for (const char of type) hash = (hash * 31 + char.codePointAt(0)) % 360;
  return `hsl(${hash} 55% 42%)`;
}

function colored(node, type) {
  node.style.setProperty("--type-color", typeColor(type)); // CSSOM: allowed by the CSP, unlike style=""
  return node;
}

export class PageView {
  /**
   * Renders into the given elements. figures.url(name) resolves to an object URL of a
   * cropped figure, cached for the task.
   */
  constructor(api, taskId, figures, { legend, stage, rendered, raw, notice }) {
    this.api = api;
    this.taskId = taskId;
    this.figures = figures;
    this.el = { legend, stage, rendered, raw, notice };
    this.pageUrl = null;
    this.controller = new AbortController();
    this.selected = null;
  }

  /** Show page `number`; resolves once its blocks are on screen (the image may still be loading). */
  async show(number) {
    this.destroy();
    this.controller = new AbortController();
    const { signal } = this.controller;
    const page = await this.api.renderedPage(this.taskId, number);
    if (signal.aborted) return;
    this.page = page;
    this.selected = null;
    this.showNotice(page);
    this.showLegend(page.blocks);
    this.showStage(page, signal);
    this.showBlocks(page.blocks, signal);
    this.el.raw.textContent = page.markdown;
  }

  destroy() {
    this.controller.abort();
    if (this.pageUrl) URL.revokeObjectURL(this.pageUrl);
    this.pageUrl = null;
  }

  showNotice(page) {
    const { notice } = this.el;
    notice.hidden = !page.truncated;
    notice.textContent = page.truncated
      ? `Truncated: the model never reached its end marker on this page (${page.truncated_reason || "no reason given"}). What it wrote up to there is kept.`
      : "";
  }

  showLegend(blocks) {
    const counts = new Map();
    for (const block of blocks) counts.set(block.type, (counts.get(block.type) ?? 0) + 1);
    fill(
      this.el.legend,
      [...counts].map(([type, count]) =>
        h("li", {}, colored(h("span", { className: "swatch", attrs: { "aria-hidden": "true" } }), type), `${type} (${count})`),
      ),
    );
  }

  showStage(page, signal) {
    const { stage } = this.el;
    stage.style.aspectRatio = `${page.width} / ${page.height}`;
    const placeholder = h("p", { className: "stage__placeholder" }, "Loading the page image…");
    const boxes = h("div", { className: "stage__boxes" });
    for (const block of page.blocks) {
      block.boxes.forEach((box, part) => boxes.append(this.box(block, box, part, page)));
    }
    fill(stage, placeholder, boxes);
    this.api
      .pageImage(this.taskId, page.page, signal)
      .then((blob) => {
        if (signal.aborted) return;
        this.pageUrl = URL.createObjectURL(blob);
        const image = h("img", { className: "stage__image", src: this.pageUrl, alt: `Page ${page.page}` });
        placeholder.replaceWith(image);
      })
      .catch((error) => {
        if (!signal.aborted) placeholder.textContent = `No page image: ${error.message}`;
      });
  }

  box(block, [x0, y0, x1, y1], part, page) {
    const button = colored(
      h("button", {
        type: "button",
        className: "box",
        dataset: { block: block.index },
        // One stop per block for the keyboard, however many boxes it has.
        tabIndex: part === 0 ? 0 : -1,
        attrs: { "aria-label": `${block.type}, block ${block.index + 1}` },
        title: block.type,
        onclick: () => this.select(block.index, "rendered"),
      }),
      block.type,
    );
    const { style } = button;
    style.left = `${(x0 / page.width) * 100}%`;
    style.top = `${(y0 / page.height) * 100}%`;
    style.width = `${((x1 - x0) / page.width) * 100}%`;
    style.height = `${((y1 - y0) / page.height) * 100}%`;
    this.link(button, block.index);
    return button;
  }

  showBlocks(blocks, signal) {
    const items = blocks.map((block) => {
      const content = h("div", { className: "block__content" });
      // The one place the console inserts HTML: the server rendered it from the model's Markdown
      // and sanitised it against an allowlist (app/render/sanitize.py).
      content.innerHTML = block.html;
      if (block.image) content.prepend(this.figure(block.image, signal));
      const item = colored(
        h(
          "div",
          {
            className: "block",
            tabIndex: 0,
            dataset: { block: block.index },
            attrs: { role: "group", "aria-label": `${block.type}, block ${block.index + 1}` },
            onclick: () => this.select(block.index, "stage"),
          },
          h("span", { className: "block__type" }, block.type),
          content,
        ),
        block.type,
      );
      this.link(item, block.index);
      return item;
    });
    if (!items.length) items.push(h("p", { className: "muted" }, "No blocks on this page."));
    fill(this.el.rendered, items);
  }

  figure(name, signal) {
    const image = h("img", { className: "block__figure", alt: `Figure ${name}` });
    this.figures.url(name).then(
      (url) => {
        image.src = url;
      },
      (error) => {
        if (!signal.aborted) image.alt = `Figure ${name} could not be loaded: ${error.message}`;
      },
    );
    return image;
  }

  link(node, index) {
    const on = () => this.highlight(index, true);
    const off = () => this.highlight(index, false);
    node.addEventListener("mouseenter", on);
    node.addEventListener("mouseleave", off);
    node.addEventListener("focus", on);
    node.addEventListener("blur", off);
  }

  partners(index) {
    const selector = `[data-block="${Number(index)}"]`;
    return [...this.el.stage.querySelectorAll(selector), ...this.el.rendered.querySelectorAll(selector)];
  }

  highlight(index, on) {
    for (const node of this.partners(index)) node.classList.toggle("is-active", on);
  }

  /** A click: keep the block marked, and bring its partner on the other side into view. */
  select(index, reveal) {
    if (this.selected !== null) for (const node of this.partners(this.selected)) node.classList.remove("is-selected");
    this.selected = index;
    for (const node of this.partners(index)) node.classList.add("is-selected");
    const pane = reveal === "rendered" ? this.el.rendered : this.el.stage;
    pane.querySelector(`[data-block="${Number(index)}"]`)?.scrollIntoView({ block: "nearest", behavior: "smooth" });
  }
}
