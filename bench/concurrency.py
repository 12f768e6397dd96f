"""Pages in flight: one document through the remote ``vllm`` engine at several concurrencies.

Runs the same N-page PDF (16 by default) through the real page pipeline (render, recognise over
HTTP, parse, assemble, store) with ``APP_VLLM_CONCURRENCY`` = 1, 4 and 16, and prints pages/s and
the speed-up over one page at a time. The server is ``transformers serve`` with the tiny random
DeepSeek-OCR-2 on CPU, started here (the tests' launcher), or any OpenAI-compatible server given
with ``--url`` (a real ``vllm serve`` on a GPU is where concurrency pays: it batches the pages).
The tiny model almost never says eos, so every page costs exactly ``--max-tokens`` tokens.

``--fake-latency S`` swaps the model server for a scripted one that answers every page after S
seconds however many it holds, an ideal batching server: what is left is the service's own
ceiling (rendering, PNG encoding, assembly) on this machine.

    python -m bench.concurrency                       # transformers serve, 16 pages, 32 tokens/page
    python -m bench.concurrency --fake-latency 1.0    # the service's own ceiling
    python -m bench.concurrency --url http://gpu-box:8000 --max-tokens 2048
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is built here; nothing is downloaded

from app.documents import DocumentKind
from app.engines.base import RecognizeOptions  # after the environment above
from app.engines.manager import ModelManager
from app.engines.vllm import RemoteEngine
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage
from app.pipeline.run import PageJob, PagePipeline
from app.storage.local import LocalStore
from app.tasks.options import MODE_PROMPTS
from tests.documents import make_pdf
from tests.openai_servers import FakeOpenAI, Reply, TransformersServe, completion
from tests.standins import StandInGpu
from tests.tiny_model import build_tiny_ocr2


@dataclass(frozen=True)
class Run:
    concurrency: int
    seconds: float
    pages: int
    page_latency: float  # median seconds from sending a page to its answer

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds


async def run_once(url: str, pdf: Path, work: Path, *, pages: int, concurrency: int, max_tokens: int) -> Run:
    """The whole document through a fresh pipeline and engine at ``concurrency``."""

    def factory() -> tuple[RemoteEngine, str]:
        engine = RemoteEngine(
            url,
            model=None,
            api_key=None,
            concurrency=concurrency,
            max_tokens=max_tokens,
            timeout_seconds=600,
            retries=0,
        )
        return engine, "bench"

    store = LocalStore(work / f"c{concurrency}")
    metrics = Metrics(StandInGpu())
    models = ModelManager(factory, idle_seconds=3600, metrics=metrics)
    pipeline = PagePipeline(store=store, models=models, metrics=metrics)
    task_id = uuid.uuid4().hex
    (store.root / "tasks" / task_id).mkdir(parents=True)
    job = PageJob(
        task_id=task_id,
        input_path=pdf,
        kind=DocumentKind.PDF,
        page_numbers=range(1, pages + 1),
        dpi=144,
        max_pixels=40_000_000,
        batch_size=1,
        recognize=RecognizeOptions(
            prompt=MODE_PROMPTS["document"],
            base_size=1024,
            image_size=640,
            crop_mode=True,
            max_new_tokens=max_tokens,
            timeout_seconds=600,
        ),
    )
    latencies: list[float] = []

    async def on_page(page: AssembledPage, seconds: float) -> None:
        latencies.append(seconds)

    await models.ensure_loaded()  # asks /v1/models: not part of the measured conversion
    started = time.perf_counter()
    try:
        done = await pipeline.run(job, on_page=on_page, check_interrupt=lambda: None)
    finally:
        await models.unload()
    seconds = time.perf_counter() - started
    assert len(done) == pages
    return Run(concurrency, seconds, pages, statistics.median(latencies))


async def bench(url: str, work: Path, *, pages: int, concurrencies: list[int], max_tokens: int) -> list[Run]:
    pdf = work / "document.pdf"
    pdf.write_bytes(make_pdf(pages))
    # Warm the server (first-request costs: lazy imports, allocator) on one page, unmeasured.
    await run_once(url, pdf, work / "warm", pages=1, concurrency=1, max_tokens=max_tokens)
    return [
        await run_once(url, pdf, work, pages=pages, concurrency=c, max_tokens=max_tokens)
        for c in concurrencies
    ]


def table(runs: list[Run]) -> str:
    base = runs[0].pages_per_second
    lines = [
        "| concurrency | seconds | pages/s | speed-up | median page latency (s) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.concurrency} | {run.seconds:.1f} | {run.pages_per_second:.2f} | "
            f"{run.pages_per_second / base:.2f}x | {run.page_latency:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", help="an OpenAI-compatible server; unset: start transformers serve here")
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated, the first is the base")
    parser.add_argument("--fake-latency", type=float, help="seconds per page of a scripted ideal server")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="dsocr-bench-") as tmp, contextlib.ExitStack() as servers:
        work = Path(tmp)
        url = args.url
        where = url
        if args.fake_latency is not None:
            latency = args.fake_latency
            fake = FakeOpenAI(respond=lambda body: Reply(completion("text", "length"), delay=latency))
            servers.callback(fake.close)
            url, where = fake.url, f"a scripted server answering each page in {latency:g} s"
        elif url is None:
            model_dir = build_tiny_ocr2(work / "tiny-ocr2")
            serve = TransformersServe(model_dir, work).start()
            servers.callback(serve.stop)
            print(f"starting transformers serve with the tiny model at {serve.url} ...", flush=True)
            url = serve.wait_ready().url
            where = "transformers serve, tiny DeepSeek-OCR-2 on CPU"
        runs = asyncio.run(
            bench(url, work, pages=args.pages, concurrencies=concurrencies, max_tokens=args.max_tokens)
        )
    print(f"\n{args.pages} pages, {args.max_tokens} tokens per page, {where}, {os.cpu_count()} CPUs\n")
    print(table(runs))


if __name__ == "__main__":
    main()
