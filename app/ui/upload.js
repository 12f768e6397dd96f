// New tasks: files by drag-and-drop or the picker (several at once), or a URL, with options.

import { h } from "./dom.js";

/**
 * Wires the upload card in index.html. onCreated(view) is called with each task the service
 * accepted; a refusal is shown next to its file.
 */
export function mountUpload(api, onCreated) {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  const log = document.getElementById("uploads");

  document.getElementById("pick").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    send([...input.files]);
    input.value = ""; // the same file can be chosen again
  });

  // A file dropped anywhere else must not make the browser leave the console to open it.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
  drop.addEventListener("dragenter", () => drop.classList.add("is-over"));
  drop.addEventListener("dragover", (event) => {
    event.dataTransfer.dropEffect = "copy";
    drop.classList.add("is-over");
  });
  drop.addEventListener("dragleave", (event) => {
    if (!drop.contains(event.relatedTarget)) drop.classList.remove("is-over");
  });
  drop.addEventListener("drop", (event) => {
    drop.classList.remove("is-over");
    send([...event.dataTransfer.files]);
  });

  document.getElementById("url-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const field = document.getElementById("url");
    const url = field.value.trim();
    const line = report(url);
    line.sending();
    try {
      const view = await api.createFromUrl(url, options());
      line.done(view);
      field.value = "";
      onCreated(view);
    } catch (error) {
      line.failed(error);
    }
  });

  // One upload at a time: each waits for the service's answer, which keeps the order of the tasks
  // the order of the files and leaves the browser's connections to the live progress streams.
  async function send(files) {
    const lines = files.map((file) => [file, report(file.name)]);
    for (const [file, line] of lines) {
      try {
        line.sending();
        const view = await api.upload(file, options());
        line.done(view);
        onCreated(view);
      } catch (error) {
        line.failed(error);
      }
    }
  }

  function report(name) {
    const state = h("span", { className: "uploads__state" }, "waiting");
    const item = h("li", {}, h("span", { className: "uploads__name" }, name), " ", state);
    log.prepend(item);
    while (log.children.length > 8) log.lastElementChild.remove();
    return {
      sending() {
        state.textContent = "sending…";
      },
      done(view) {
        state.textContent = `accepted: ${view.progress.pages_total} page(s), ${view.status}`;
        item.classList.add("is-ok");
      },
      failed(error) {
        state.textContent = `refused: ${error.message}`;
        item.classList.add("is-error");
      },
    };
  }
}

/** The task options the form holds; empty fields are left to the service's defaults. */
function options() {
  const value = (id) => document.getElementById(id).value.trim();
  const chosen = { mode: value("opt-mode"), pages: value("opt-pages"), resolution: value("opt-resolution") };
  const dpi = value("opt-dpi");
  if (dpi) chosen.dpi = Number(dpi);
  return Object.fromEntries(Object.entries(chosen).filter(([, v]) => v !== ""));
}
