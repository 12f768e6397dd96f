"""The service's own cost per page against an engine that answers at once, and its memory.

An OpenAI-compatible engine that answers every page at once with a full grounded page (a title,
five paragraphs, a figure and a table: ``tests.openai_servers.FULL_GROUNDED_PAGE``) runs in a
process of its own, applying the vLLM stand-in's request rules (``VllmStandIn``: the body is
validated, the image decoded, the prompt's tokens counted against the context). Against it, with
16 pages in flight and the same pages of a real PDF:

* **bare**: the least any client must do, in this process: render each page with PyMuPDF at 144
  dpi (one page at a time: PyMuPDF is not safe across threads), encode it as PNG, POST it, write
  the text to a file; 16 threads.
* **service**: ``python -m app`` in a fresh process (``APP_BACKEND=vllm``, 16 requests in flight,
  ``APP_PAGE_RETRIES=0``: the bare client retries nothing, but each page is still judged, at the
  service's cost), one task of the same pages, from the upload until it succeeded. CPU is the
  service process's plus its render processes'; peak RSS is the service process's high-water mark
  (``VmHWM``).

Runs alternate (bare, service, bare, service, ...) so a noisy neighbour hurts both alike; the
table shows each run and the ratio to the bare run beside it. ``--memory 200,1000`` adds the
service's peak RSS for tasks of those lengths (one fresh process each), for the flat-memory rule.
A last row, for information, runs the default retry ladder (``--ladder 2``): the canned page never
agrees with the PDF's text layer, so every page is recognised three times.

The PDF: the Octave manual (1,158 pages) from Debian's ``octave-doc``::

    apt-get download octave-doc && dpkg -x octave-doc_*.deb x
    python -m bench.ceiling --pdf x/usr/share/doc/octave/octave.pdf --pages 200 --repeat 2
    python -m bench.ceiling --pdf x/usr/share/doc/octave/octave.pdf --memory 200,1000 --repeat 0
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import psutil
import pymupdf
from PIL import Image

from tests.servers import LoopbackProcess, ProcessServer

IN_FLIGHT = 16
DPI = 144
PROMPT = "<|grounding|>Convert the document to markdown."


# --- the engine -----------------------------------------------------------------------------------


def serve_engine(port: int) -> None:
    """Serve the instant engine on ``port`` until killed (the engine process's body)."""
    from tests.openai_servers import VllmStandIn, full_page_answer

    VllmStandIn(answer=full_page_answer, port=port)
    threading.Event().wait()  # it serves in a thread of its own


class EngineProcess(LoopbackProcess):
    def start(self) -> EngineProcess:
        command = [sys.executable, "-m", "bench.ceiling", "--serve-engine", str(self.port)]
        self.spawn(command, os.environ, cwd=Path(__file__).resolve().parent.parent)
        self.wait_ready("/v1/models", 120)
        return self

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the engine has spent so far: it runs alongside, on the
        same cores, and what it costs a page depends on what it is sent."""
        assert self.process is not None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system


# --- the bare client ------------------------------------------------------------------------------


def run_bare(url: str, pdf: Path, pages: int, out_dir: Path) -> tuple[float, float]:
    """Render, encode, POST and write each page with 16 threads; the seconds it took and the CPU
    seconds this process spent."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()  # PyMuPDF may not be used from several threads at once
    document = pymupdf.open(pdf)
    local = threading.local()

    def one(number: int) -> None:
        with lock:
            pixmap = document.load_page(number - 1).get_pixmap(dpi=DPI)
            image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {
            "model": "deepseek-ai/DeepSeek-OCR",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ],
            "max_tokens": 4096,
            "temperature": 0.0,
            "skip_special_tokens": False,
        }
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, timeout=120)
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        text = response.json()["choices"][0]["message"]["content"]
        (out_dir / f"p{number:04d}.md").write_text(text)

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(one, range(1, pages + 1)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    document.close()
    return elapsed, cpu


# --- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceRun:
    seconds: float
    cpu_seconds: float  # the service process and its render processes
    main_cpu_seconds: float  # the service process alone
    peak_rss_mib: float  # the service process's VmHWM


def _tree_cpu(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds (user + system) of ``process`` and of it with its living children."""
    own = process.cpu_times()
    main = own.user + own.system
    total = main
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = child.cpu_times()
            total += times.user + times.system
    return main, total


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@contextlib.contextmanager
def service(engine_url: str, work: Path, max_pages: int, retries: int) -> Iterator[ProcessServer]:
    env = {
        "APP_DATA_DIR": str(work / "data"),
        "APP_BACKEND": "vllm",
        "APP_VLLM_URL": engine_url,
        "APP_VLLM_CONCURRENCY": str(IN_FLIGHT),
        "APP_MAX_PAGES": str(max_pages),
        "APP_LOG_LEVEL": "warning",
        "APP_PAGE_RETRIES": str(retries),
    }
    work.mkdir(parents=True, exist_ok=True)
    server = ProcessServer(env, work / "service.log").start(timeout=120)
    try:
        yield server
    finally:
        server.stop()


def _wait(client: httpx.Client, task_id: str) -> None:
    while (view := client.get(f"/v1/tasks/{task_id}").json())["status"] in ("queued", "running"):
        time.sleep(0.1)
    if view["status"] != "succeeded":
        raise SystemExit(f"task {task_id} {view['status']}: {view['error']}")


def run_service(
    engine_url: str, pdf: Path, pages: int, work: Path, max_pages: int, retries: int = 0
) -> ServiceRun:
    """One task of ``pages`` pages on a fresh service (after a one-page task to warm it up), with
    ``retries`` as ``APP_PAGE_RETRIES``."""
    data = pdf.read_bytes()
    with (
        service(engine_url, work, max_pages, retries) as server,
        httpx.Client(base_url=server.url, timeout=120) as client,
    ):
        assert server.process is not None
        process = psutil.Process(server.process.pid)

        def submit(selection: str) -> str:
            files = {"file": (pdf.name, data, "application/pdf")}
            response = client.post("/v1/tasks/upload", files=files, data={"pages": selection})
            response.raise_for_status()
            return str(response.json()["task_id"])

        _wait(client, submit("1"))
        main_before, total_before = _tree_cpu(process)
        started = time.perf_counter()
        _wait(client, submit(f"1-{pages}"))
        seconds = time.perf_counter() - started
        main_after, total_after = _tree_cpu(process)
        return ServiceRun(
            seconds, total_after - total_before, main_after - main_before, _peak_rss_mib(process.pid)
        )


# --- the report -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pdf", type=Path, help="a real multi-page PDF")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2, help="bare/service pairs")
    parser.add_argument("--memory", default="", help="comma-separated task lengths for peak RSS")
    parser.add_argument(
        "--ladder", type=int, default=2, metavar="N", help="a last run with APP_PAGE_RETRIES=N (0: none)"
    )
    parser.add_argument("--serve-engine", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_engine is not None:
        serve_engine(args.serve_engine)
        return
    if args.pdf is None:
        parser.error("--pdf is required")
    page_count = pymupdf.open(args.pdf).page_count
    lengths = [int(n) for n in args.memory.split(",") if n]
    if max([args.pages, *lengths]) > page_count:
        parser.error(f"{args.pdf} has {page_count} pages")

    with tempfile.TemporaryDirectory(prefix="dsocr-ceiling-") as tmp:
        work = Path(tmp)
        engine = EngineProcess(work / "engine.log").start()
        try:
            run_bare(engine.url, args.pdf, 4, work / "warm")  # the engine's first requests
            print(
                f"{args.pages} pages of {args.pdf.name} ({page_count} pages), {DPI} dpi, "
                f"{IN_FLIGHT} in flight, {os.cpu_count()} CPUs; the service with APP_PAGE_RETRIES=0 "
                "(the bare client retries nothing; each page is still judged, at the service's cost)",
                flush=True,
            )
            print(
                "| run | pages/s | x bare | CPU a page (service process alone) | engine's CPU a page "
                "| peak RSS |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            for n in range(args.repeat):
                engine_cpu = engine.cpu_seconds()
                seconds, cpu = run_bare(engine.url, args.pdf, args.pages, work / f"bare{n}")
                engine_cpu = engine.cpu_seconds() - engine_cpu
                bare = args.pages / seconds
                print(
                    f"| bare client {n + 1} | {bare:.1f} | 1.00 | {1000 * cpu / args.pages:.0f} ms | "
                    f"{1000 * engine_cpu / args.pages:.0f} ms | - |",
                    flush=True,
                )
                engine_cpu = engine.cpu_seconds()
                run = run_service(engine.url, args.pdf, args.pages, work / f"service{n}", page_count)
                engine_cpu = engine.cpu_seconds() - engine_cpu
                rate = args.pages / run.seconds
                print(
                    f"| service {n + 1}, one task of {args.pages} pages | {rate:.1f} | {rate / bare:.2f} | "
                    f"{1000 * run.cpu_seconds / args.pages:.0f} ms "
                    f"({1000 * run.main_cpu_seconds / args.pages:.0f} ms) | "
                    f"{1000 * engine_cpu / args.pages:.0f} ms | {run.peak_rss_mib:.0f} MiB |",
                    flush=True,
                )
            for length in lengths:
                run = run_service(engine.url, args.pdf, length, work / f"memory{length}", page_count)
                print(
                    f"| service, one task of {length} pages | {length / run.seconds:.1f} | - | "
                    f"{1000 * run.cpu_seconds / length:.0f} ms "
                    f"({1000 * run.main_cpu_seconds / length:.0f} ms) | - | {run.peak_rss_mib:.0f} MiB |",
                    flush=True,
                )
            if args.ladder and args.repeat:
                # For information: the engine's canned page never agrees with the manual's text
                # layer, so every page climbs the whole ladder (1 + N requests a page).
                run = run_service(
                    engine.url, args.pdf, args.pages, work / "ladder", page_count, retries=args.ladder
                )
                rate = args.pages / run.seconds
                print(
                    f"| service, APP_PAGE_RETRIES={args.ladder} (every page suspect) | {rate:.1f} | "
                    f"{rate / bare:.2f} | {1000 * run.cpu_seconds / args.pages:.0f} ms "
                    f"({1000 * run.main_cpu_seconds / args.pages:.0f} ms) | - | "
                    f"{run.peak_rss_mib:.0f} MiB |",
                    flush=True,
                )
        finally:
            engine.stop()


if __name__ == "__main__":
    main()
