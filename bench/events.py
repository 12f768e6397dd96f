"""Do open event streams slow the workers? Pages/s of one task with 0 and with N followers.

Starts the service as ``python -m app`` (its own process, as users run it) with the tiny random
DeepSeek-OCR-2 on CPU, then per round:

1. submits a short "blocker" task, so the worker is busy (and the model loaded) meanwhile;
2. submits the measured task (``--pages`` pages) and opens ``--streams`` event streams on *that
   same task*: the worst case, every page event goes out to every stream;
3. checks every stream is connected (its first event arrived) while the task is still queued;
4. times the task on the server's own clock (``started_at`` to ``finished_at``) and checks that
   each stream got every page event and the end.

Rounds alternate 0 and N streams; the table gives the median pages/s of each and their ratio
(goal: at least 0.9). The streams are plain asyncio sockets reading bytes, so the clients cost the
machine little. The tiny model makes pages far cheaper than real ones (seconds each), which makes
any overhead per event stand out more than in production.

    python -m bench.events                      # 200 streams, 3 rounds of each
    python -m bench.events --streams 500 --pages 60 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built here; nothing is downloaded

import httpx  # after the environment above

from tests.documents import make_pdf
from tests.servers import ProcessServer
from tests.tiny_model import build_tiny_ocr2

KEY = "sk_bench"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Small renders and the model's smallest size: pages as cheap as this service makes them, so that
# any cost per event would show.
CHEAP_PAGES = {"dpi": "72", "resolution": "tiny"}


@dataclass(frozen=True)
class Round:
    streams: int
    pages: int
    seconds: float  # the task's own duration, measured by the server

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds


class Arrivals:
    """Counts streams whose first event arrived; ``all`` is set when every one has."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.all = asyncio.Event()
        if not total:
            self.all.set()

    def arrived(self) -> None:
        self.count += 1
        if self.count == self.total:
            self.all.set()


async def follow(host: str, port: int, task_id: str, arrivals: Arrivals) -> bytes:
    """One event stream over a raw socket: the whole body, once the server closes it."""
    reader, writer = await asyncio.open_connection(host, port)
    request = (
        f"GET /v1/tasks/{task_id}/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    body = bytearray()
    first = True
    try:
        while chunk := await reader.read(65536):
            body += chunk
            if first and b"event: " in body:
                first = False
                arrivals.arrived()
    finally:
        writer.close()
        await writer.wait_closed()
    return bytes(body)


async def run_round(
    client: httpx.AsyncClient, url: str, document: bytes, blocker: bytes, pages: int, streams: int
) -> Round:
    await client.post("/v1/tasks/upload", files={"file": ("blocker.pdf", blocker)}, data=CHEAP_PAGES)
    response = await client.post(
        "/v1/tasks/upload", files={"file": ("measured.pdf", document)}, data=CHEAP_PAGES
    )
    response.raise_for_status()
    task_id = response.json()["task_id"]
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    arrivals = Arrivals(streams)
    followers = [asyncio.create_task(follow(host, port, task_id, arrivals)) for _ in range(streams)]
    await asyncio.wait_for(arrivals.all.wait(), timeout=120)
    status = (await client.get(f"/v1/tasks/{task_id}")).json()["status"]
    if status != "queued":
        raise SystemExit("the measured task started before every stream was open: raise --blocker-pages")
    while (view := (await client.get(f"/v1/tasks/{task_id}", params={"wait": 60})).json())["status"] in (
        "queued",
        "running",
    ):
        pass
    if view["status"] != "succeeded":
        raise SystemExit(f"the measured task {view['status']}: {view['error']}")
    for body in await asyncio.wait_for(asyncio.gather(*followers), timeout=120):
        if body.count(b"event: page") != pages or b"event: end" not in body:
            raise SystemExit("a stream missed events")
    seconds = (
        datetime.fromisoformat(view["finished_at"]) - datetime.fromisoformat(view["started_at"])
    ).total_seconds()
    return Round(streams, pages, seconds)


async def bench(url: str, *, pages: int, blocker_pages: int, streams: int, rounds: int) -> list[Round]:
    document = make_pdf(pages, picture_page=None)
    blocker = make_pdf(blocker_pages, picture_page=None)
    results = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
        await run_round(client, url, make_pdf(2, picture_page=None), blocker, 2, 0)  # warm-up, unmeasured
        for n in range(rounds * 2):
            count = 0 if n % 2 == 0 else streams
            results.append(await run_round(client, url, document, blocker, pages, count))
            print(f"  {count:4d} streams: {results[-1].pages_per_second:6.2f} pages/s", flush=True)
    return results


def table(rounds: list[Round]) -> str:
    counts = sorted({r.streams for r in rounds})
    median = {c: statistics.median(r.pages_per_second for r in rounds if r.streams == c) for c in counts}
    lines = [
        "| open streams on the task | rounds | pages/s (median) | each round | ratio to 0 streams |",
        "|---:|---:|---:|---|---:|",
    ]
    for count in counts:
        each = ", ".join(f"{r.pages_per_second:.2f}" for r in rounds if r.streams == count)
        runs = sum(1 for r in rounds if r.streams == count)
        lines.append(
            f"| {count} | {runs} | {median[count]:.2f} | {each} | {median[count] / median[counts[0]]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--pages", type=int, default=40, help="pages of the measured task")
    parser.add_argument("--blocker-pages", type=int, default=8, help="pages of the task run meanwhile")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (0 and N streams)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per page (the tiny model)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dsocr-bench-events-") as tmp:
        work = Path(tmp)
        env = {
            "APP_DATA_DIR": str(work / "data"),
            "APP_DS_MODEL_PATH": str(build_tiny_ocr2(work / "tiny-ocr2")),
            "APP_DS_DTYPE": "float32",
            "APP_DS_MAX_NEW_TOKENS": str(args.max_tokens),
            "APP_DS_BATCH_SIZE": "1",  # one page per call: events at a steady rate, not in bursts
            "APP_FORCE_CPU": "true",
            "APP_API_KEYS": KEY,
            "APP_LOG_LEVEL": "warning",
            "HF_HUB_OFFLINE": "1",
        }
        server = ProcessServer(env, work / "server.log").start()
        try:
            started = time.monotonic()
            rounds = asyncio.run(
                bench(
                    server.url,
                    pages=args.pages,
                    blocker_pages=args.blocker_pages,
                    streams=args.streams,
                    rounds=args.rounds,
                )
            )
        finally:
            server.stop()
    print(
        f"\n{args.pages}-page task at 72 dpi, resolution tiny, {args.max_tokens} tokens per page, "
        "tiny DeepSeek-OCR-2 on CPU, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - started:.0f} s in all\n"
    )
    print(table(rounds))


if __name__ == "__main__":
    main()
