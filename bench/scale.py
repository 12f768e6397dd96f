"""Pages per second with 1 and 2 worker processes: the scale-out mode against one remote engine.

Starts a real deployment on loopback: Redis (append-only, fsync always), moto's S3 server, one
``APP_ROLE=api`` process and ``APP_ROLE=worker`` processes with ``APP_BACKEND=vllm`` pointing at
one ``transformers serve`` with the tiny random DeepSeek-OCR-2 on CPU (or any OpenAI-compatible
server given with ``--url``). The same N pages, as several tasks, are submitted at once and timed
from the first upload to the last task's end, with 1 worker, then 2 (a second one is added).
Every page goes the whole way: upload, Redis queue, render, recognise over HTTP, raw page, preview
and results to S3, record and events in Redis.

What limits it on a 2-core machine: everything shares the two cores, and the model server is
serial. ``transformers serve`` runs ``generate()`` for one request at a time and takes about a core
and a half while it does, so a second worker adds no model throughput and its own work (rendering,
preview and page encoding, S3 writes, record saves) competes with the model for the same cores.
Measured on a quiet machine: 1.43-1.45 pages/s with one worker, 1.35-1.37 with two (0.93-0.96x).
The mode is for workers on other machines beside a batching ``vllm serve`` pool; there workers add
pages in flight and the ratio follows the servers' batching headroom (``bench/concurrency.py``
shows 3.9x at 4 requests in flight against a batching server). The tiny model almost never says
eos, so every page costs ``--max-tokens`` tokens.

``--fake-latency S`` replaces the model server with a scripted ideal one that answers every page in
S seconds however many it holds: then what a worker can have in flight (``--concurrency``) is the
limit, and a second worker should double the pages per second, minus the service's own overhead.

    python -m bench.scale                               # 24 pages as 6 tasks, 1 and 2 workers
    python -m bench.scale --fake-latency 1 --concurrency 2   # an ideal batching server instead
    python -m bench.scale --pages 16 --tasks 4 --max-tokens 16
    python -m bench.scale --url http://gpu-box:8000 --max-tokens 2048 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built here; nothing is downloaded
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import httpx  # after the environment above

from tests.documents import make_pdf
from tests.openai_servers import FakeOpenAI, Reply, TransformersServe, completion
from tests.scale_cluster import Cluster, RedisServer, S3Server, submit, wait_until_ended
from tests.tiny_model import build_tiny_ocr2


@dataclass(frozen=True)
class Run:
    workers: int
    seconds: float
    pages: int

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds


def split(pages: int, tasks: int) -> list[int]:
    """``pages`` as ``tasks`` documents of near-equal length."""
    return [pages // tasks + (1 if i < pages % tasks else 0) for i in range(tasks)]


def run_once(client: httpx.Client, documents: list[bytes], pages: int, workers: int) -> Run:
    """Submit every document at once; the time until the last one ended."""
    started = time.perf_counter()
    task_ids = [submit(client, document, f"doc{i}.pdf") for i, document in enumerate(documents)]
    for task_id in task_ids:
        ended = wait_until_ended(client, task_id, timeout=1800)
        if ended["status"] != "succeeded":
            raise RuntimeError(f"task {task_id} ended {ended['status']}: {ended['error']}")
    return Run(workers, time.perf_counter() - started, pages)


def table(runs: list[Run]) -> str:
    base = runs[0].pages_per_second
    lines = ["| workers | seconds | pages/s | vs 1 worker |", "|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(
            f"| {run.workers} | {run.seconds:.1f} | {run.pages_per_second:.2f} | "
            f"{run.pages_per_second / base:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", help="an OpenAI-compatible server; unset: start transformers serve here")
    parser.add_argument("--pages", type=int, default=24)
    parser.add_argument("--tasks", type=int, default=6, help="the pages are split into this many tasks")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workers", default="1,2", help="comma-separated, increasing; the first is the base")
    parser.add_argument("--concurrency", type=int, default=16, help="APP_VLLM_CONCURRENCY of each worker")
    parser.add_argument("--fake-latency", type=float, help="seconds per page of a scripted ideal server")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    documents = [make_pdf(n, picture_page=None) for n in split(args.pages, args.tasks)]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's S3 server logs every request

    with tempfile.TemporaryDirectory(prefix="dsocr-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        url, where = args.url, args.url
        if args.fake_latency is not None:
            latency = args.fake_latency
            fake = FakeOpenAI(respond=lambda body: Reply(completion("text", "length"), delay=latency))
            stack.callback(fake.close)
            url, where = fake.url, f"a scripted ideal server ({latency:g} s a page, any number at once)"
        elif url is None:
            serve = TransformersServe(build_tiny_ocr2(work / "tiny-ocr2"), work).start()
            stack.callback(serve.stop)
            print(f"starting transformers serve with the tiny model at {serve.url} ...", flush=True)
            url = serve.wait_ready().url
            where = "transformers serve, tiny DeepSeek-OCR-2 on CPU"
        redis_server = RedisServer(work).start()
        stack.callback(redis_server.stop)
        s3 = S3Server()
        stack.callback(s3.close)
        env = {
            "APP_BACKEND": "vllm",
            "APP_VLLM_URL": url,
            "APP_VLLM_MAX_TOKENS": str(args.max_tokens),
            "APP_VLLM_CONCURRENCY": str(args.concurrency),
            "APP_VLLM_RETRIES": "0",
            "APP_LOG_LEVEL": "warning",
            "APP_VISIBILITY_TIMEOUT_SECONDS": "60",
        }
        cluster = Cluster(work / "cluster", model_dir=None, redis_server=redis_server, s3=s3, env=env)
        stack.callback(cluster.close)
        cluster.start(apis=1, workers=0)
        client = cluster.client(timeout=120)
        runs = []
        for count in counts:
            while len(cluster.workers) < count:
                cluster.add_worker()
            # Unmeasured: first-request costs of the model server and of each new worker.
            run_once(client, [make_pdf(1, picture_page=None)] * count, count, count)
            print(f"{count} worker(s) ...", flush=True)
            runs.append(run_once(client, documents, args.pages, count))
    print(
        f"\n{args.pages} pages as {args.tasks} tasks, {args.max_tokens} tokens per page, {where}, "
        f"{args.concurrency} in flight per worker, {os.cpu_count()} CPUs\n"
    )
    print(table(runs))


if __name__ == "__main__":
    main()
