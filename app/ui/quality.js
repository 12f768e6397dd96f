// How far to trust each result page: result.json's pages[i].quality, shown as a mark in the page
// picker and a note above the page. Results of servers older than the quality signal have no
// `quality` on their pages; then nothing here is shown.

import { h } from "./dom.js";

// What each reason the server gives means to a reader; a reason added later shows as its code.
const REASONS = {
  no_end_marker: "the model never reached its end marker",
  repeating_tail: "the text ends in a repeating loop",
  empty_output: "nothing was recognised on a page that has content",
  low_agreement: "the text disagrees with the PDF's own text layer",
  box_outside_page: "a block's box lies outside the page",
};

export function reasonText(reason) {
  return Object.hasOwn(REASONS, reason) ? REASONS[reason] : reason;
}

export function percent(share) {
  return `${Math.round(share * 100)}%`;
}

/**
 * Page number -> quality of a task's result.json (only the pages that carry one), or null when no
 * page does (a result from an older server).
 */
export function qualityByPage(result) {
  const byPage = new Map();
  for (const entry of result?.pages ?? []) {
    if (entry && typeof entry === "object" && entry.quality) byPage.set(entry.page, entry.quality);
  }
  return byPage.size ? byPage : null;
}

/** The page picker's text for a page: its number, agreement, and a mark when suspect or truncated. */
export function optionText(number, quality, truncated) {
  const parts = [`Page ${number}`];
  if (quality?.text_layer_agreement != null) parts.push(`agreement ${percent(quality.text_layer_agreement)}`);
  let text = parts.join(" · ");
  if (quality?.suspect) text += " ⚠ suspect";
  if (truncated) text += " ⚠ truncated";
  return text;
}

/** The note above a page: its agreement, its attempts, and why it is suspect, or null. */
export function qualityNote(quality) {
  if (!quality) return null;
  const agreement =
    quality.text_layer_agreement == null
      ? "No text layer to compare with."
      : `Agreement with the PDF's text layer: ${percent(quality.text_layer_agreement)}.`;
  const kept = quality.rung ? `the attempt of retry rung ${quality.rung}` : "the first attempt";
  const attempts = quality.attempts > 1 ? ` Recognised ${quality.attempts} times; kept ${kept}.` : "";
  const reasons = quality.reasons ?? [];
  return h(
    "div",
    {
      className: quality.suspect ? "quality quality--suspect" : "quality",
      attrs: { role: "note", "aria-label": "Page quality" },
    },
    quality.suspect ? [h("strong", { className: "quality__mark" }, "⚠ Suspect page"), " "] : null,
    h("span", { className: "quality__agreement" }, agreement + attempts),
    reasons.length
      ? h(
          "ul",
          { className: "quality__reasons", attrs: { "aria-label": "Why it is suspect" } },
          reasons.map((reason) => h("li", { dataset: { reason } }, reasonText(reason), " (", h("code", {}, reason), ")")),
        )
      : null,
  );
}
