// Numbers and times as people read them.

export function duration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** Seconds the task has run: to its end, or to now while it runs. */
export function runSeconds(view) {
  if (!view.started_at) return null;
  const end = view.finished_at ? Date.parse(view.finished_at) : Date.now();
  return Math.max(0, (end - Date.parse(view.started_at)) / 1000);
}

export function pagesPerSecond(view) {
  const seconds = runSeconds(view);
  const done = view.progress?.pages_done ?? 0;
  if (!seconds || !done) return "";
  const rate = done / seconds;
  return `${rate >= 10 ? rate.toFixed(0) : rate.toFixed(2)} pages/s`;
}

export function bytes(size) {
  if (size == null) return "";
  const units = ["B", "KB", "MB", "GB"];
  let value = size;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

export function when(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** A file-name stem safe to offer as a download name: the source's name without its extension. */
export function stem(filename, fallback) {
  const base = (filename || "").replace(/\.[^.]*$/, "").replace(/[^\w.-]+/g, "_").slice(0, 80);
  return base.replace(/^[._]+/, "") || fallback;
}
