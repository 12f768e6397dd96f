// What the signed-in key's tenant used in the last 30 days (GET /v1/usage): a table of days and the
// totals; an admin key sees a table per tenant. Servers without usage accounting answer 404, and
// then the panel stays hidden.

import { ApiError } from "./api.js";
import { fill, h } from "./dom.js";
import { bytes, duration } from "./format.js";

const DAYS = 30;
// [field of a day or total, column heading, how a value reads]
const COLUMNS = [
  ["tasks", "Tasks", count],
  ["pages", "Pages", count],
  ["prompt_tokens", "Prompt tokens", count],
  ["completion_tokens", "Completion tokens", count],
  ["engine_seconds", "Engine time", (seconds) => duration(seconds) || "0.0 s"],
  ["bytes_in", "Bytes in", bytes],
  ["bytes_out", "Bytes out", bytes],
];

function count(value) {
  return (value ?? 0).toLocaleString();
}

/** The last `days` days up to today, as the YYYY-MM-DD of UTC days (the server counts in UTC). */
export function lastDays(days, now = new Date()) {
  const to = now.toISOString().slice(0, 10);
  const from = new Date(now.getTime() - (days - 1) * 86_400_000).toISOString().slice(0, 10);
  return { from, to };
}

export class UsagePanel {
  /** Renders into the #usage section, which stays hidden until the server answers with usage. */
  constructor(api) {
    this.api = api;
    this.root = document.getElementById("usage");
    this.body = document.getElementById("usage-body");
    document.getElementById("usage-refresh").addEventListener("click", () => this.load());
  }

  async load() {
    let usage;
    try {
      usage = await this.api.usage(lastDays(DAYS));
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        this.root.hidden = true; // a server without usage accounting
        return;
      }
      this.root.hidden = false;
      fill(this.body, h("p", { className: "error", attrs: { role: "alert" } }, `Could not read the usage: ${error.message}`));
      return;
    }
    this.root.hidden = false;
    const tenants = usage.tenants ?? [];
    fill(
      this.body,
      h("p", { className: "muted" }, `${usage.from} to ${usage.to} (UTC)`),
      tenants.length ? tenants.map((tenant) => this.table(tenant)) : h("p", { className: "muted" }, "No usage recorded."),
    );
  }

  table(tenant) {
    const name = tenant.tenant ?? "Tasks made without a key";
    // Newest day first: the one people look for.
    const days = [...(tenant.days ?? [])].sort((a, b) => b.date.localeCompare(a.date));
    const cells = (figures) => COLUMNS.map(([field, , show]) => h("td", { dataset: { field } }, show(figures?.[field] ?? 0)));
    return h(
      "div",
      // A wide table scrolls inside its own box, never the page; focusable, so the keyboard scrolls it.
      { className: "usage__scroll", tabIndex: 0, attrs: { role: "region", "aria-label": `Usage of ${name}` } },
      h(
        "table",
        { className: "usage__table", dataset: { tenant: tenant.tenant ?? "" } },
        h("caption", {}, name),
        h(
          "thead",
          {},
          h("tr", {}, h("th", { scope: "col" }, "Day"), COLUMNS.map(([, heading]) => h("th", { scope: "col" }, heading))),
        ),
        h(
          "tbody",
          {},
          days.length
            ? days.map((day) => h("tr", { dataset: { date: day.date } }, h("th", { scope: "row" }, day.date), cells(day)))
            : h("tr", {}, h("td", { colSpan: COLUMNS.length + 1, className: "usage__none muted" }, "Nothing in these days.")),
        ),
        h("tfoot", {}, h("tr", {}, h("th", { scope: "row" }, "Total"), cells(tenant.total))),
      ),
    );
  }
}
