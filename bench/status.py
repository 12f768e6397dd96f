"""Status reads per second and their p99 while a task runs on the ``hf`` engine, against no task.

The service runs in its own process (``--serve``, uvicorn with the tiny DeepSeek-OCR-2 on CPU and
the scripted answer of ``bench/pipeline.py``, so every page generates the same tokens). This
process is the load generator: ``--connections`` keep-alive connections on raw asyncio streams
(cheaper per request than an HTTP client library, so the generator takes less of the two cores
from the server it measures), each sending ``GET /v1/tasks/{id}`` back to back for ``--seconds``.

Baseline: the same reads of a finished task with nothing running. Loaded: the same reads of a
task that runs the whole time (checked before and after: a window in which the task ended is
refused, not reported).

    python bench/status.py                       # 8 connections, 5 s a window, twice
    python bench/status.py --pages 60 --max-new-tokens 64 --connections 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # after the environment above

from tests.documents import make_pdf
from tests.servers import LoopbackProcess

ANSWER = (
    "<|ref|>title<|/ref|><|det|>[[120, 60, 600, 100]]<|/det|>\n# Heading\n\n"
    "<|ref|>text<|/ref|><|det|>[[120, 110, 700, 140]]<|/det|>\nBody text of the page.\n\n"
)


def serve(
    model_dir: Path, data_dir: Path, port: int, *, batch_size: int, max_new_tokens: int, threads: int
) -> None:
    """The service with the tiny model under uvicorn on ``port``, until killed (the child's side)."""
    import torch
    import uvicorn
    from transformers import AutoTokenizer

    from app.config import Settings
    from app.engines.hf import HFEngine
    from app.main import create_app
    from tests.tiny_model import ScriptedAnswers

    if threads:
        torch.set_num_threads(threads)
    settings = Settings(
        data_dir=data_dir,
        ds_dtype="float32",
        ds_batch_size=batch_size,
        ds_max_new_tokens=max_new_tokens,
        force_cpu=True,
        log_level="warning",
    )

    def factory() -> tuple[HFEngine, str]:
        script = ScriptedAnswers([ANSWER], AutoTokenizer.from_pretrained(model_dir))
        engine = HFEngine(
            str(model_dir),
            device="cpu",
            dtype="float32",
            use_flash_attn=False,
            batch_size=batch_size,
            no_repeat_ngram_size=0,
            logits_processors=lambda: [script],
        )
        return engine, "bench"

    uvicorn.run(
        create_app(settings, engine_factory=factory), host="127.0.0.1", port=port, log_level="warning"
    )


@dataclass(frozen=True)
class Window:
    reads: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.reads / self.seconds

    def quantile(self, q: float) -> float:
        return statistics.quantiles(self.latencies, n=1000)[int(q * 1000) - 1] * 1000


async def _reader(port: int, path: str, stop_at: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    try:
        while (started := time.perf_counter()) < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(1)
    finally:
        writer.close()


async def hammer(port: int, path: str, connections: int, seconds: float) -> Window:
    """``connections`` keep-alive loops of GET ``path`` for ``seconds``."""
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    stop_at = started + seconds
    await asyncio.gather(*(_reader(port, path, stop_at, latencies, errors) for _ in range(connections)))
    return Window(len(latencies), len(errors), time.perf_counter() - started, latencies)


def status_of(client: httpx.Client, task_id: str) -> dict[str, object]:
    return client.get(f"/v1/tasks/{task_id}").json()


def wait_ended(client: httpx.Client, task_id: str) -> None:
    while status_of(client, task_id)["status"] in ("queued", "running"):
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=200, help="pages of the task that runs under load")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads of the service; 0: torch's default"
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured window")
    parser.add_argument("--repeat", type=int, default=2, help="baseline and loaded windows, alternating")
    parser.add_argument("--serve", nargs=3, metavar=("MODEL_DIR", "DATA_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        model_dir, data_dir, port = args.serve
        serve(
            Path(model_dir),
            Path(data_dir),
            int(port),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads,
        )
        return

    from tests.tiny_model import build_tiny_ocr2

    with tempfile.TemporaryDirectory(prefix="dsocr-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_ocr2(root / "tiny-ocr2")
        server = LoopbackProcess(root / "server.log")
        child = [
            sys.executable,
            __file__,
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--threads",
            str(args.threads),
            "--serve",
            str(model_dir),
            str(root / "data"),
            str(server.port),
        ]
        server.spawn(child, os.environ)
        try:
            server.wait_ready("/healthz", 120)
            rows = run(server, args)
        finally:
            server.stop()
    print(
        f"\nGET /v1/tasks/{{id}}, {args.connections} keep-alive connections, {args.seconds:g} s windows; "
        f"task: tiny DeepSeek-OCR-2 on CPU, batch {args.batch_size}, {args.max_new_tokens} tokens a page; "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| run | reads/s | p50 ms | p99 ms | errors | reads/s vs no task |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, window, base in rows:
        print(
            f"| {name} | {window.per_second:,.0f} | {window.quantile(0.5):.1f} | "
            f"{window.quantile(0.99):.1f} | {window.errors} | {window.per_second / base.per_second:.2f}x |"
        )


def run(server: LoopbackProcess, args: argparse.Namespace) -> list[tuple[str, Window, Window]]:
    rows = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # Load the model and warm every path once, unmeasured.
        warm = client.post("/v1/tasks/upload", files={"file": ("warm.pdf", make_pdf(1))}).json()["task_id"]
        wait_ended(client, warm)
        document = make_pdf(args.pages, picture_page=None)
        for n in range(1, args.repeat + 1):
            base = asyncio.run(hammer(server.port, f"/v1/tasks/{warm}", args.connections, args.seconds))
            rows.append((f"no task running #{n}", base, base))
            task = client.post("/v1/tasks/upload", files={"file": (f"bench{n}.pdf", document)}).json()[
                "task_id"
            ]
            while status_of(client, task)["status"] != "running":
                time.sleep(0.05)
            time.sleep(2)  # past the first page: the model is generating when the window opens
            before = status_of(client, task)["progress"]["pages_done"]
            loaded = asyncio.run(hammer(server.port, f"/v1/tasks/{task}", args.connections, args.seconds))
            view = status_of(client, task)
            if view["status"] != "running":
                raise SystemExit(f"the task ended ({view['status']}) inside the window: raise --pages")
            done = view["progress"]["pages_done"] - before
            rows.append((f"task running #{n} ({done} pages stored meanwhile)", loaded, base))
            client.delete(f"/v1/tasks/{task}")
            wait_ended(client, task)
    return rows


if __name__ == "__main__":
    main()
