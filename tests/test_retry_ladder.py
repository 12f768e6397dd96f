"""The retry ladder (issue 17): a suspect page is recognised again, rung by rung, and the best
attempt is kept; every attempt stays in raw/, and a resumed task does not run a rung again.

The tiny model is scripted (``ScriptedAnswers``: the k-th sequence generated says answer k), so a
page's first attempt can run away (a repeating tail cut by the token cap, no end marker) or come
back empty, and a later rung can succeed. Sequences are generated in a fixed order: the first
attempts of a batch, then each page's retries when it is next to be assembled (a later batch may be
sent before them, while the first generates: the tests keep their pages to one batch).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pymupdf
from transformers import AutoTokenizer

from app.documents import DocumentKind
from app.engines.base import END_MARKER
from app.engines.hf import HFEngine
from app.engines.manager import ModelManager
from app.engines.vllm import RemoteEngine
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage
from app.pipeline.run import PageJob, PagePipeline
from app.records import TaskOptions
from app.storage.local import LocalStore
from app.tasks.options import STRICT_NGRAM_SIZE, STRICT_NGRAM_WINDOW, EngineDefaults, ladder
from tests.openai_servers import VllmStandIn
from tests.sse import events_path, read_events
from tests.standins import InstrumentedEngine, StandInGpu
from tests.tiny_model import ScriptedAnswers

MAX_NEW_TOKENS = 384  # the runaway below passes 200 characters of repeats within it
WORDS = [  # more than 20 words a page, so the agreement with the text layer is measured
    "quarterly report on regional water services with tables of reservoir levels rainfall and the "
    "demand of every town over the last three years",
    "the committee reviewed maintenance costs of pumping stations and the budget for next year with "
    "notes from each district engineer on repairs",
    "annual survey of libraries museums and archives across the northern districts with visitor "
    "numbers opening hours and staff for each site",
]


def grounded(text: str) -> str:
    """A page as the model gives it in document mode: one text block over the whole page."""
    return f"<|ref|>text<|/ref|><|det|>[[20, 20, 980, 300]]<|/det|>\n{text}"


# Runs away: the same unit over and over, far past the token cap, so it never ends.
RUNAWAY = grounded(WORDS[0] + " " + "la " * 600)


def make_document(path: Path, pages: int) -> bytes:
    """Small pages, each with a text layer of more than 20 words (so agreement is measured)."""
    doc = pymupdf.open()
    for number in range(pages):
        page = doc.new_page(width=300, height=420)
        page.insert_textbox(pymupdf.Rect(20, 20, 280, 400), WORDS[number], fontsize=11)
    data = doc.tobytes()
    doc.close()
    path.write_bytes(data)
    return data


def raw_files(data_dir: Path, task_id: str) -> dict[str, dict[str, Any]]:
    raw = data_dir / "tasks" / task_id / "raw"
    return {path.name: json.loads(path.read_bytes()) for path in sorted(raw.iterdir())}


def run_to_end(client: httpx.Client, data: bytes) -> tuple[str, dict[str, Any]]:
    """Upload the document and follow its events to the end; the task id and the final event's view."""
    upload = client.post("/v1/tasks/upload", files={"file": ("doc.pdf", data)}, data={"dpi": "72"})
    assert upload.status_code == 202, upload.text
    task_id = upload.json()["task_id"]
    with client.stream("GET", events_path(task_id)) as stream:
        final = [event for event in read_events(stream) if event.event == "end"]
    assert len(final) == 1
    return task_id, final[0].data


def test_a_runaway_and_an_empty_page_climb_the_ladder_and_keep_the_rung_that_worked(make_server, tmp_path):
    data = make_document(tmp_path / "doc.pdf", 3)
    # Sequences: the three pages in one batch, then page 1's retry and page 2's retry. (With two
    # batches, page 3's would be sent while the first generates, ahead of the retries.)
    answers = [RUNAWAY, "", grounded(WORDS[2]), grounded(WORDS[0]), grounded(WORDS[1])]
    server = make_server(answers=answers, ds_max_new_tokens=MAX_NEW_TOKENS, ds_batch_size=3, page_retries=2)
    task_id, final = run_to_end(server.client, data)
    assert final["status"] == "succeeded", final
    assert (final["suspect_pages"], final["retries"]) == (0, 2)
    assert final["truncated_pages"] == []

    result = server.client.get(f"/v1/tasks/{task_id}/result.json").json()
    quality = [page["quality"] for page in result["pages"]]
    # Page 1 ran away: the stricter no-repeat rung (1) fixed it. Page 2 came back empty: the
    # no-repeat rung cannot cure that and is passed over; the other resolution (rung 2) fixed it.
    assert [(q["attempts"], q["rung"], q["suspect"], q["reasons"]) for q in quality] == [
        (2, 1, False, []),
        (2, 2, False, []),
        (1, 0, False, []),
    ]
    assert all(q["text_layer_agreement"] > 0.9 for q in quality)
    assert (result["suspect_pages"], result["retries"]) == (0, 2)
    markdown = server.client.get(f"/v1/tasks/{task_id}/result.md").text
    assert "la la la" not in markdown
    assert all(words in markdown for words in WORDS)

    raw = raw_files(server.data_dir, task_id)
    assert sorted(raw) == ["p0001.json", "p0001.r1.json", "p0002.json", "p0002.r2.json", "p0003.json"]
    assert raw["p0001.json"]["stop_reason"] == "max_tokens"  # the runaway is kept, as it came
    assert raw["p0001.json"]["tokens"] == MAX_NEW_TOKENS
    assert raw["p0002.json"]["text"] == END_MARKER
    first, strict, other_view = raw["p0001.json"], raw["p0001.r1.json"], raw["p0002.r2.json"]
    assert (first["rung"], strict["rung"], other_view["rung"]) == (0, 1, 2)
    assert first["options"]["no_repeat_ngram_size"] is None
    assert strict["options"]["no_repeat_ngram_size"] == STRICT_NGRAM_SIZE
    assert strict["options"]["ngram_window"] == STRICT_NGRAM_WINDOW
    assert other_view["options"]["crop_mode"] is not first["options"]["crop_mode"]
    assert all(entry["prompt_tokens"] > 0 for entry in raw.values())  # the hf engine counts them

    metrics = server.client.get("/metrics").text
    assert "dsocr_page_retries_total 2.0" in metrics
    assert "dsocr_page_text_agreement_count 3.0" in metrics


def test_app_page_retries_0_keeps_first_attempts_and_counts_them_suspect(make_server, tmp_path):
    data = make_document(tmp_path / "doc.pdf", 2)
    server = make_server(
        answers=[RUNAWAY, "", grounded(WORDS[0])], ds_max_new_tokens=MAX_NEW_TOKENS, page_retries=0
    )
    task_id, final = run_to_end(server.client, data)
    assert final["status"] == "succeeded", final
    assert (final["suspect_pages"], final["retries"]) == (2, 0)
    assert final["truncated_pages"] == [1]
    result = server.client.get(f"/v1/tasks/{task_id}/result.json").json()
    quality = [page["quality"] for page in result["pages"]]
    assert [(q["attempts"], q["rung"], q["suspect"]) for q in quality] == [(1, 0, True), (1, 0, True)]
    assert quality[0]["reasons"] == ["no_end_marker", "repeating_tail"]
    assert quality[1]["reasons"] == ["empty_output", "low_agreement"]  # no word of the text layer
    assert sorted(raw_files(server.data_dir, task_id)) == ["p0001.json", "p0002.json"]
    assert server.engines[0].calls == 1  # both pages in one batch, nothing retried


async def test_a_resumed_task_reads_back_the_rungs_it_ran_and_runs_only_the_rest(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    document = tmp_path / "doc.pdf"
    make_document(document, 1)
    store = LocalStore(tmp_path / "data")
    task_id = uuid.uuid4().hex
    (store.root / "tasks" / task_id).mkdir(parents=True)
    rungs = ladder(TaskOptions(), engine_defaults())
    # An earlier start ran the first attempt and rung 1, both runaways, then its worker died.
    runaway = {"page": 1, "text": "la " * 300, "stop_reason": "max_tokens", "tokens": MAX_NEW_TOKENS}
    store.write_raw(task_id, 1, {**runaway, "rung": 0})
    store.write_raw(task_id, 1, {**runaway, "rung": 1}, attempt=1)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    script = ScriptedAnswers([grounded(WORDS[0])], tokenizer)
    engines: list[InstrumentedEngine] = []

    def factory() -> tuple[InstrumentedEngine, str]:
        inner = HFEngine(
            str(tiny_model_dir),
            device="cpu",
            dtype="float32",
            use_flash_attn=False,
            batch_size=1,
            no_repeat_ngram_size=0,
            logits_processors=lambda: [script],
        )
        engines.append(InstrumentedEngine(inner))
        return engines[-1], "the tiny test model, scripted"

    metrics = Metrics(StandInGpu())
    models = ModelManager(factory, idle_seconds=60, metrics=metrics)
    pipeline = PagePipeline(store=store, models=models, metrics=metrics)
    job = PageJob(
        task_id=task_id,
        input_path=document,
        kind=DocumentKind.PDF,
        page_numbers=[1],
        dpi=72,
        max_pixels=10_000_000,
        batch_size=1,
        recognize=rungs[0].options,
        retries=rungs[1:],
        max_retries=3,
        min_agreement=0.5,
    )
    seen: list[tuple[AssembledPage, float]] = []

    async def on_page(page: AssembledPage, seconds: float) -> None:
        seen.append((page, seconds))

    with await pipeline.run(job, on_page=on_page, check_interrupt=lambda: None) as done:
        entries = [page.result_entry() for page in done]
    await models.unload()

    # Rungs 0 and 1 were read back; only rung 2 (the other resolution) was asked of the engine.
    assert engines[0].calls == 1
    assert entries[0]["quality"] == {
        "text_layer_agreement": 1.0,
        "suspect": False,
        "reasons": [],
        "attempts": 3,
        "rung": 2,
    }
    assert WORDS[0] in entries[0]["markdown"]
    ((page, seconds),) = seen
    assert (page.suspect, page.retries) == (False, 2)
    assert seconds > 0  # the one attempt that ran is timed
    raw = raw_files(store.root, task_id)
    assert sorted(raw) == ["p0001.json", "p0001.r1.json", "p0001.r2.json"]
    assert raw["p0001.r2.json"]["rung"] == 2
    assert raw["p0001.r2.json"]["options"]["crop_mode"] is False  # gundam -> base


def engine_defaults(max_new_tokens: int = MAX_NEW_TOKENS) -> EngineDefaults:
    return EngineDefaults(
        prompt_override=None,
        base_size=1024,
        image_size=640,
        crop_mode=True,
        max_new_tokens=max_new_tokens,
        timeout_seconds=60,
    )


async def test_on_vllm_rungs_send_the_stricter_ngram_arguments_and_the_token_cap(tmp_path: Path) -> None:
    document = tmp_path / "doc.pdf"
    make_document(document, 1)
    store = LocalStore(tmp_path / "data")
    task_id = uuid.uuid4().hex
    (store.root / "tasks" / task_id).mkdir(parents=True)
    rungs = ladder(TaskOptions(), engine_defaults())
    server = VllmStandIn(answer=lambda prompt: RUNAWAY)  # every attempt runs away
    try:

        def factory() -> tuple[RemoteEngine, str]:
            engine = RemoteEngine(
                server.url,
                model=None,
                api_key=None,
                concurrency=2,
                max_tokens=MAX_NEW_TOKENS,
                timeout_seconds=30,
                retries=0,
            )
            return engine, "stand-in"

        metrics = Metrics(StandInGpu())
        models = ModelManager(factory, idle_seconds=60, metrics=metrics)
        pipeline = PagePipeline(store=store, models=models, metrics=metrics)
        job = PageJob(
            task_id=task_id,
            input_path=document,
            kind=DocumentKind.PDF,
            page_numbers=[1],
            dpi=72,
            max_pixels=10_000_000,
            batch_size=1,
            recognize=rungs[0].options,
            retries=rungs[1:],
            max_retries=2,
        )

        async def on_page(page: AssembledPage, seconds: float) -> None:
            pass

        with await pipeline.run(job, on_page=on_page, check_interrupt=lambda: None) as done:
            (entry,) = [page.result_entry() for page in done]
        await models.unload()
        bodies = server.chat_bodies()
    finally:
        server.close()

    # Rung 2 (the other resolution) is passed over: vLLM decides the image geometry, so its request
    # would be rung 1's again. Rung 3 caps the tokens at a quarter of the page's.
    assert len(bodies) == 3
    assert [body["vllm_xargs"]["ngram_size"] for body in bodies] == [30, STRICT_NGRAM_SIZE, STRICT_NGRAM_SIZE]
    assert [body["vllm_xargs"]["window_size"] for body in bodies] == [
        90,
        STRICT_NGRAM_WINDOW,
        STRICT_NGRAM_WINDOW,
    ]
    assert [body["max_tokens"] for body in bodies] == [MAX_NEW_TOKENS, MAX_NEW_TOKENS, MAX_NEW_TOKENS // 4]
    raw = raw_files(store.root, task_id)
    assert sorted(raw) == ["p0001.json", "p0001.r1.json", "p0001.r3.json"]
    assert all(entry["prompt_tokens"] > 0 for entry in raw.values())  # the server's usage
    # Every attempt stops at its cap; the capped one ends before the loop, which ranks it above
    # the runaways, and still suspect.
    assert entry["quality"]["attempts"] == 3
    assert entry["quality"]["rung"] == 3
    assert entry["quality"]["suspect"] is True
    assert "repeating_tail" not in entry["quality"]["reasons"]
    assert entry["truncated"] is True


def test_the_ladder_rungs_by_mode() -> None:
    defaults = engine_defaults(8192)
    document = ladder(TaskOptions(), defaults)
    assert [rung.options.prompt for rung in document][-1] == "Free OCR."
    assert document[3].options.token_limit == 2048
    assert sorted(document[1].remedies) == ["no_end_marker", "repeating_tail"]
    # Outside document mode, or with the user's own prompt, the prompt is never replaced.
    for options in (TaskOptions(mode="figure"), TaskOptions(prompt="Read the labels.")):
        rungs = ladder(options, defaults)
        assert len(rungs) == 4
        assert {rung.options.prompt for rung in rungs} == {rungs[0].options.prompt}
    base = ladder(TaskOptions(resolution="base"), defaults)
    assert (base[2].options.base_size, base[2].options.image_size, base[2].options.crop_mode) == (
        1024,
        640,
        True,
    )


def test_raw_attempts_of_a_task_go_with_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "data")
    task_id = uuid.uuid4().hex
    (store.root / "tasks" / task_id).mkdir(parents=True)
    store.write_raw(task_id, 7, {"text": "first"})
    store.write_raw(task_id, 7, {"text": "third"}, attempt=3)
    assert store.read_raw(task_id, 7) == {"text": "first"}
    assert store.read_raw(task_id, 7, attempt=3) == {"text": "third"}
    assert store.read_raw(task_id, 7, attempt=1) is None
    store.delete(task_id)
    assert store.read_raw(task_id, 7, attempt=3) is None
    assert not (store.root / "tasks" / task_id).exists()
