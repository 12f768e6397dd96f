// Saving results: they need the Authorization header, so a plain link cannot fetch them. The file
// is fetched as a blob and handed to the browser through a short-lived object URL.

import { h } from "./dom.js";

export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000); // the download has started long before
}

/**
 * Object URLs of one task's figures, fetched once each and released together. The cache owns the
 * fetches (one figure can be shown in a page's block and in the gallery): release() aborts them.
 */
export class FigureCache {
  constructor(api, taskId) {
    this.api = api;
    this.taskId = taskId;
    this.controller = new AbortController();
    this.urls = new Map(); // name -> Promise<object URL>
  }

  url(name) {
    if (!this.urls.has(name)) {
      const { signal } = this.controller;
      const pending = this.api.figure(this.taskId, name, signal).then((blob) => URL.createObjectURL(blob));
      pending.catch(() => this.urls.delete(name)); // an aborted or failed fetch is tried again next time
      this.urls.set(name, pending);
    }
    return this.urls.get(name);
  }

  release() {
    this.controller.abort();
    for (const pending of this.urls.values()) pending.then((url) => URL.revokeObjectURL(url), () => {});
    this.urls.clear();
  }
}
