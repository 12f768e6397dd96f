"""Pages per second: the engine alone against the whole service over HTTP, on the same pages.

The engine-alone run renders the PDF with PyMuPDF and calls ``HFEngine.recognize`` in batches,
which is what a hand-rolled script around the model does. The service run uploads the same PDF to
a real uvicorn server and polls until it succeeded. Both use the tiny DeepSeek-OCR-2 with a scripted
answer, so every page generates the same tokens and the ratio is the service's own overhead
(queue, records, raw files, parsing, judging, assembly, crops, HTTP). The service runs with
``APP_PAGE_RETRIES=0`` (the engine-alone run retries nothing); a last row, for information, runs
the default ladder (``--ladder 2``).

    python bench/pipeline.py --pages 16 --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from app.config import Settings
from app.documents import DocumentKind
from app.engines.base import RecognizeOptions
from app.engines.hf import HFEngine
from app.main import create_app
from app.pipeline.pages import render_pages
from tests.documents import PICTURE_RECT, make_pdf, norm_box
from tests.servers import ThreadedServer
from tests.tiny_model import ScriptedAnswers, build_tiny_ocr2

ANSWER = (
    "<|ref|>title<|/ref|><|det|>[[120, 60, 600, 100]]<|/det|>\n# Heading\n\n"
    "<|ref|>text<|/ref|><|det|>[[120, 110, 700, 140]]<|/det|>\nBody text of the page.\n\n"
    f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n"
)


def engine_for(model_dir: Path, batch_size: int) -> HFEngine:
    script = ScriptedAnswers([ANSWER], AutoTokenizer.from_pretrained(model_dir))
    return HFEngine(
        str(model_dir),
        device="cpu",
        dtype="float32",
        use_flash_attn=False,
        batch_size=batch_size,
        no_repeat_ngram_size=0,
        logits_processors=lambda: [script],
    )


def run_engine_alone(model_dir: Path, pdf: Path, pages: int, batch_size: int, max_new_tokens: int) -> float:
    engine = engine_for(model_dir, batch_size)
    engine.load()
    options = RecognizeOptions(
        prompt="<|grounding|>Convert the document to markdown.",
        base_size=1024,
        image_size=768,
        crop_mode=True,
        max_new_tokens=max_new_tokens,
        timeout_seconds=300,
    )
    started = time.perf_counter()
    batch = []
    for page in render_pages(pdf, DocumentKind.PDF, range(1, pages + 1), dpi=144, max_pixels=40_000_000):
        batch.append(page.image)
        if len(batch) == batch_size:
            engine.recognize(batch, options)
            batch = []
    if batch:
        engine.recognize(batch, options)
    elapsed = time.perf_counter() - started
    engine.unload()
    return elapsed


def run_service(
    model_dir: Path,
    data_dir: Path,
    pdf: Path,
    batch_size: int,
    max_new_tokens: int,
    *,
    retries: int = 0,
    render_processes: int = 2,
) -> float:
    settings = Settings(
        data_dir=data_dir,
        ds_dtype="float32",
        ds_batch_size=batch_size,
        ds_max_new_tokens=max_new_tokens,
        force_cpu=True,
        log_level="warning",
        # The engine-alone run retries nothing; pages are still judged, at the service's cost.
        page_retries=retries,
        render_processes=render_processes,
    )

    def factory() -> tuple[HFEngine, str]:
        return engine_for(model_dir, batch_size), "bench"

    with (
        ThreadedServer(create_app(settings, engine_factory=factory)) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        # Load the model once outside the timing, as the engine-alone run does.
        warm = client.post("/v1/tasks/upload", files={"file": ("warm.pdf", make_pdf(1))}).json()
        wait(client, warm["task_id"])
        started = time.perf_counter()
        task = client.post("/v1/tasks/upload", files={"file": ("bench.pdf", pdf.read_bytes())}).json()
        wait(client, task["task_id"])
        return time.perf_counter() - started


def wait(client: httpx.Client, task_id: str) -> None:
    while (view := client.get(f"/v1/tasks/{task_id}").json())["status"] in ("queued", "running"):
        time.sleep(0.05)  # a coarser poll would add its half-period to the service's time
    if view["status"] != "succeeded":
        raise SystemExit(f"task {task_id} {view['status']}: {view['error']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each path, alternating; best is kept")
    parser.add_argument("--render-processes", type=int, default=2, help="APP_RENDER_PROCESSES")
    parser.add_argument(
        "--ladder", type=int, default=2, metavar="N", help="a last run with APP_PAGE_RETRIES=N (0: none)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="dsocr-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_ocr2(root / "tiny-ocr2")
        pdf = root / "bench.pdf"
        pdf.write_bytes(make_pdf(args.pages, picture_page=1))
        # Warm-up: the first generate() in a process pays for lazy initialisation.
        run_engine_alone(model_dir, pdf, 1, 1, args.max_new_tokens)
        engine_runs, service_runs = [], []
        for n in range(args.repeat):  # alternating, so a noisy neighbour hurts both paths alike
            engine_runs.append(
                run_engine_alone(model_dir, pdf, args.pages, args.batch_size, args.max_new_tokens)
            )
            service_runs.append(
                run_service(
                    model_dir,
                    root / f"data{n}",
                    pdf,
                    args.batch_size,
                    args.max_new_tokens,
                    render_processes=args.render_processes,
                )
            )
        engine_s, service_s = min(engine_runs), min(service_runs)
        ladder_s = (
            run_service(
                model_dir,
                root / "ladder",
                pdf,
                args.batch_size,
                args.max_new_tokens,
                retries=args.ladder,
                render_processes=args.render_processes,
            )
            if args.ladder
            else None
        )

    rows = [
        ("engine alone (render + generate)", engine_s),
        ("service over HTTP (end to end)", service_s),
    ]
    print(
        f"{args.pages} pages, batch {args.batch_size}, tiny DeepSeek-OCR-2 on CPU, {args.threads} threads, "
        f"{args.render_processes} render processes, best of {args.repeat} (runs: engine "
        f"{', '.join(f'{s:.2f}' for s in engine_runs)} s, "
        f"service {', '.join(f'{s:.2f}' for s in service_runs)} s); "
        "the service with APP_PAGE_RETRIES=0, as the engine-alone run retries nothing"
    )
    print(f"{'path':<34} {'seconds':>8} {'pages/s':>8}")
    for name, seconds in rows:
        print(f"{name:<34} {seconds:>8.2f} {args.pages / seconds:>8.2f}")
    print(f"{'service / engine (throughput)':<34} {'':>8} {engine_s / service_s:>8.2f}")
    if ladder_s is not None:
        # For information: the scripted answer is not the pages' text, so pages may be suspect.
        print(
            f"{f'service, APP_PAGE_RETRIES={args.ladder}':<34} {ladder_s:>8.2f} {args.pages / ladder_s:>8.2f}"
            f"  ({engine_s / ladder_s:.2f} x engine)"
        )


if __name__ == "__main__":
    main()
