// The console's entry point: sign-in, then the task list or one task, by the URL's hash
// (#/ or #/tasks/<id>[/<page>]), so the browser's back button and reloads work.

import { Api, ApiError, forgetKey, storedKey, storeKey } from "./api.js";
import { TaskList } from "./tasklist.js";
import { TaskView } from "./taskview.js";
import { mountUpload } from "./upload.js";
import { UsagePanel } from "./usage.js";

const screens = {
  signIn: document.getElementById("sign-in"),
  home: document.getElementById("home"),
  task: document.getElementById("task"),
};
const toast = document.getElementById("toast");
let toastTimer;

function notify(message) {
  toast.textContent = message;
  toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    toast.hidden = true;
  }, 8000);
}

function show(name) {
  for (const [key, node] of Object.entries(screens)) node.hidden = key !== name;
}

function refusal(error) {
  if (error instanceof ApiError && error.status === 401) return "The service refused this API key.";
  return `Could not reach the service: ${error.message}`;
}

function signIn(message = "") {
  show("signIn");
  document.getElementById("sign-in-error").textContent = message;
  document.getElementById("key").focus();
}

function start(api) {
  const tasks = new TaskList(api, notify);
  const taskView = new TaskView(api, screens.task, notify);
  const usage = new UsagePanel(api);
  mountUpload(api, (view) => tasks.add(view));
  const signOut = document.getElementById("sign-out");
  signOut.hidden = false;
  signOut.addEventListener("click", () => {
    forgetKey();
    location.assign("#/");
    location.reload(); // drops every stream, object URL and cached result with the page
  });

  function route() {
    const match = /^#\/tasks\/([0-9a-f]{1,64})(?:\/(\d+))?$/.exec(location.hash);
    if (match) {
      tasks.stop();
      show("task");
      taskView.open(match[1], match[2] ? Number(match[2]) : null);
    } else {
      taskView.close();
      show("home");
      tasks.load();
      usage.load();
    }
  }
  window.addEventListener("hashchange", route);
  route();
}

async function boot() {
  document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = document.getElementById("key").value.trim();
    const api = new Api(key);
    try {
      await api.check();
    } catch (error) {
      signIn(refusal(error));
      return;
    }
    storeKey(key);
    document.getElementById("key").value = "";
    start(api);
  });

  const key = storedKey();
  if (key === null) {
    signIn();
    return;
  }
  const api = new Api(key);
  try {
    await api.check();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) forgetKey();
    signIn(refusal(error));
    return;
  }
  start(api);
}

boot();
