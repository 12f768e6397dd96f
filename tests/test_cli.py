"""The ``dsocr`` command as a subprocess against a real server: a folder, a re-run, JSON, Ctrl-C,
and ``dsocr eval``'s figures against the results they come from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dsocr_client.models import SUSPECT_REASONS
from tests.documents import ANSWER_WELL, READ_BADLY, READ_WELL, RUNAWAY, make_pdf, png_bytes, text_pdf
from tests.proxy import LONGER_THAN_KEEP_ALIVE, EventStreamProxy, a_page_done
from tests.servers import wait_for
from tests.test_api_e2e import PAGE_1

CORRUPT_PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\n%%EOF garbage"


def dsocr(*args: str, url: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DSOCR_URL": url, "DSOCR_API_KEY": "sk_test"}
    command = [sys.executable, "-m", "dsocr_client.cli", *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def make_folder(root: Path) -> Path:
    folder = root / "docs"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.pdf").write_bytes(make_pdf(2, picture_page=None))
    (folder / "b.pdf").write_bytes(make_pdf(1, picture_page=None))
    (folder / "nested" / "c.pdf").write_bytes(make_pdf(1, picture_page=None))
    (folder / "photo.png").write_bytes(png_bytes())
    (folder / "nested" / "scan.jpg").write_bytes(png_bytes())  # the server sniffs, not the suffix
    (folder / "broken.pdf").write_bytes(CORRUPT_PDF)
    (folder / "notes.txt").write_text("not a document: a folder search leaves it out")
    return folder


def test_a_folder_converts_reports_the_corrupt_file_and_a_rerun_skips(make_server, tmp_path):
    server = make_server(answers=[PAGE_1])
    folder = make_folder(tmp_path)

    first = dsocr("convert", str(folder), "-o", "out", "-j", "3", "--json", url=server.url, cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["ok"], summary["succeeded"], summary["failed"]) == (False, 5, 1)
    by_name = {Path(d["path"]).name: d for d in summary["documents"]}
    assert by_name["broken.pdf"]["status"] == "failed"
    assert by_name["broken.pdf"]["error"].startswith("invalid_document: ")
    assert by_name["a.pdf"]["pages"] == 2
    assert by_name["a.pdf"]["pages_per_second"] > 0
    for name in ("a", "b", "c", "photo", "scan"):
        out = tmp_path / "out" / name
        assert sorted(p.name for p in out.iterdir()) == ["full.md", "images", "layout.json", "result.json"]
        assert "Page 1 heading" in (out / "full.md").read_text()
    assert "page 1 done" in first.stderr  # no terminal here: log lines, not bars

    again = dsocr("convert", str(folder), "-o", "out", url=server.url, cwd=tmp_path)
    assert again.returncode == 1  # the corrupt file still fails
    assert again.stdout.count("skipped") == 5
    assert "invalid_document" in again.stdout  # the summary table names the reason
    tasks = httpx.get(f"{server.url}/v1/tasks", headers={"Authorization": "Bearer sk_test"}).json()["tasks"]
    assert len(tasks) == 5  # nothing converted twice

    forced = dsocr(
        "convert", str(folder / "b.pdf"), "-o", "out", "--force", "--json", url=server.url, cwd=tmp_path
    )
    assert forced.returncode == 0
    assert json.loads(forced.stdout)["succeeded"] == 1


def test_documents_longer_than_the_keep_alive_are_all_written_and_reported(make_server, tmp_path):
    server = make_server(answers=[PAGE_1], **LONGER_THAN_KEEP_ALIVE)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(make_pdf(3, picture_page=None))
    (folder / "b.pdf").write_bytes(make_pdf(2, picture_page=None))
    (folder / "photo.png").write_bytes(png_bytes())
    (folder / "broken.pdf").write_bytes(CORRUPT_PDF)
    with EventStreamProxy(server.url) as proxy:
        dropping = proxy.drop_streams_when(a_page_done(server.client))  # and a proxy cuts the streams once
        result = dsocr("convert", str(folder), "-o", "out", "-j", "2", "--json", url=proxy.url, cwd=tmp_path)
        dropping.join()

    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    by_name = {Path(d["path"]).name: d for d in summary["documents"]}
    assert {name: d["status"] for name, d in by_name.items()} == {
        "a.pdf": "succeeded",
        "b.pdf": "succeeded",
        "photo.png": "succeeded",
        "broken.pdf": "failed",
    }
    assert by_name["broken.pdf"]["error"].startswith("invalid_document: ")
    assert (summary["succeeded"], summary["failed"]) == (3, 1)
    for name, pages in (("a", 3), ("b", 2), ("photo", 1)):
        assert (
            json.loads((tmp_path / "out" / name / "result.json").read_text())["progress"]["pages_done"]
            == pages
        )
        assert "Page 1 heading" in (tmp_path / "out" / name / "full.md").read_text()
    assert "Traceback" not in result.stderr
    assert proxy.pings >= 5  # keep-alives arrived while the documents converted
    assert proxy.dropped >= 1
    assert [r for r in proxy.events_requests() if r.headers.get("last-event-id")]  # resumed, not restarted


def test_a_document_whose_results_cannot_be_written_fails_and_the_rest_go_on(make_server, tmp_path):
    server = make_server(answers=[PAGE_1])
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.pdf").write_bytes(make_pdf(1, picture_page=None))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b").write_text("a file where b's results would go")

    # one worker thread: c is converted only if that thread outlives b's failure
    result = dsocr(
        "convert", "a.pdf", "b.pdf", "c.pdf", "-o", "out", "-j", "1", "--json", url=server.url, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    by_name = {Path(d["path"]).name: d for d in json.loads(result.stdout)["documents"]}
    assert {name: d["status"] for name, d in by_name.items()} == {
        "a.pdf": "succeeded",
        "b.pdf": "failed",
        "c.pdf": "succeeded",
    }
    assert by_name["b.pdf"]["error"].startswith("os_error: ")
    assert by_name["b.pdf"]["task_id"]  # converted on the server; only the writing failed
    assert (tmp_path / "out" / "c" / "result.json").is_file()

    table = dsocr("convert", "b.pdf", "-o", "out", url=server.url, cwd=tmp_path)
    assert table.returncode == 1
    assert "os_error" in table.stdout


def test_the_formats_asked_for_are_written_and_a_rerun_skips_them(make_server, tmp_path):
    server = make_server(answers=[PAGE_1])
    (tmp_path / "a.pdf").write_bytes(make_pdf(1, picture_page=None))
    args = ("convert", "a.pdf", "-o", "out", "--format", "chunks,html,docx,md,json", "--json")

    first = dsocr(*args, url=server.url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out" / "a"
    assert sorted(p.name for p in out.iterdir()) == [
        "chunks.json",
        "full.md",
        "images",
        "layout.json",
        "result.docx",
        "result.html",
        "result.json",
    ]
    chunks = json.loads((out / "chunks.json").read_text())["chunks"]
    assert "\n\n".join(chunk["text"] for chunk in chunks) + "\n" == (out / "full.md").read_text()
    assert "Page 1 heading</h1>" in (out / "result.html").read_text()
    assert (out / "result.docx").read_bytes().startswith(b"PK")  # a zip, as every DOCX is

    again = dsocr(*args, url=server.url, cwd=tmp_path)
    assert json.loads(again.stdout)["skipped"] == 1
    only_docx = dsocr("convert", "a.pdf", "-o", "docx-only", "--format", "docx", url=server.url, cwd=tmp_path)
    assert only_docx.returncode == 0, only_docx.stderr
    written = sorted(p.name for p in (tmp_path / "docx-only" / "a").iterdir())
    assert written == ["result.docx", "result.json"]


def test_usage_errors_exit_2_and_every_help_is_complete(tmp_path):
    missing = dsocr("convert", "nothing-here/*.pdf", url="http://127.0.0.1:9", cwd=tmp_path)
    assert missing.returncode == 2
    assert "no documents found" in missing.stderr
    assert dsocr("convert", "--jobs", "0", ".", url="http://127.0.0.1:9", cwd=tmp_path).returncode == 2
    bad_format = dsocr("convert", "--format", "md,pdf", ".", url="http://127.0.0.1:9", cwd=tmp_path)
    assert bad_format.returncode == 2
    assert "unknown format pdf" in bad_format.stderr
    for command in ("convert", "serve", "worker", "status", "cancel", "mcp"):
        shown = dsocr(command, "--help", url="http://127.0.0.1:9", cwd=tmp_path)
        assert shown.returncode == 0
        assert "Usage:" in shown.stdout


def test_a_worker_without_the_shared_queue_says_what_to_set(tmp_path):
    worker = dsocr("worker", "--port", "9", url="http://127.0.0.1:9", cwd=tmp_path, timeout=60)
    assert worker.returncode == 1
    assert "APP_ROLE=worker needs APP_QUEUE_BACKEND=redis and APP_STORAGE_BACKEND=s3" in worker.stderr
    assert "Traceback" not in worker.stderr


def test_status_and_cancel_print_the_task(make_server, tmp_path, standin_gpu):
    standin_gpu.free_bytes = 0  # held queued, so there is something to cancel
    server = make_server(answers=[PAGE_1], gpu_probe=standin_gpu, gpu_min_free_mb=1)
    task_id = server.client.post("/v1/tasks/upload", files={"file": ("a.png", png_bytes())}).json()["task_id"]
    shown = dsocr("status", task_id, url=server.url, cwd=tmp_path)
    assert json.loads(shown.stdout)["status"] == "queued"
    canceled = dsocr("cancel", task_id, url=server.url, cwd=tmp_path)
    assert json.loads(canceled.stdout)["status"] == "canceled"
    unknown = dsocr("status", "no-such-task", url=server.url, cwd=tmp_path)
    assert unknown.returncode == 1
    assert "task_not_found" in unknown.stderr
    standin_gpu.free_bytes = 8000 * 1024 * 1024  # open the gate, so the server stops at once


def test_ctrl_c_cancels_the_tasks_in_flight(make_server, tmp_path):
    server = make_server(answers=[PAGE_1], page_delay=0.5, ds_batch_size=1)
    (tmp_path / "long.pdf").write_bytes(make_pdf(20, picture_page=None))
    env = {**os.environ, "DSOCR_URL": server.url, "DSOCR_API_KEY": "sk_test"}
    command = [sys.executable, "-m", "dsocr_client.cli", "convert", "long.pdf", "--json"]
    with subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        running = wait_for(
            lambda: [t for t in server.client.get("/v1/tasks").json()["tasks"] if t["status"] == "running"]
        )
        time.sleep(0.3)  # the command is following the task's events by now
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    assert summary["documents"][0]["status"] == "canceled"
    assert server.client.get(f"/v1/tasks/{running[0]['task_id']}").json()["status"] == "canceled"


def test_ctrl_c_with_detach_lists_every_document(make_server, tmp_path):
    server = make_server(answers=[PAGE_1], page_delay=0.5, ds_batch_size=1)
    (tmp_path / "long.pdf").write_bytes(make_pdf(20, picture_page=None))
    (tmp_path / "next.pdf").write_bytes(make_pdf(1, picture_page=None))
    env = {**os.environ, "DSOCR_URL": server.url, "DSOCR_API_KEY": "sk_test"}
    command = [sys.executable, "-m", "dsocr_client.cli", "convert", "long.pdf", "next.pdf", "-j", "1"]
    with subprocess.Popen(
        [*command, "--detach", "--json"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        running = wait_for(
            lambda: [t for t in server.client.get("/v1/tasks").json()["tasks"] if t["status"] == "running"]
        )
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    task_id = running[0]["task_id"]
    server.client.delete(f"/v1/tasks/{task_id}")  # detached: it would run on after the test
    assert process.returncode == 130, stderr
    summary = json.loads(stdout)
    by_name = {Path(d["path"]).name: d for d in summary["documents"]}
    assert (by_name["long.pdf"]["status"], by_name["long.pdf"]["task_id"]) == ("running", task_id)
    assert by_name["next.pdf"]["status"] == "canceled"
    assert by_name["next.pdf"]["error"] == "interrupted before it was sent"
    assert (summary["running"], summary["canceled"]) == (1, 1)


# --- dsocr eval ---------------------------------------------------------------------------------


# Two paragraphs of well over the 20 words a text layer needs before the server compares with it
# (app/pipeline/quality.py MIN_LAYER_TOKENS).
def expected_figures(pages: list[dict]) -> dict:
    """What ``dsocr eval`` must report for these result.json pages, worked out here on its own."""
    quality = [page["quality"] for page in pages]
    agreements = [q["text_layer_agreement"] for q in quality if q["text_layer_agreement"] is not None]
    reasons = {reason for q in quality for reason in q["reasons"]}
    return {
        "pages": len(pages),
        "suspect_pages": sum(q["suspect"] for q in quality),
        "suspect_share": sum(q["suspect"] for q in quality) / len(pages),
        "reasons": {r: sum(r in q["reasons"] for q in quality) for r in reasons},
        "agreement_mean": sum(agreements) / len(agreements) if agreements else None,
        "agreement_worst": min(agreements) if agreements else None,
        "retries": sum(q["attempts"] - 1 for q in quality),
    }


def assert_figures(reported: dict, expected: dict) -> None:
    assert reported["pages"] == reported["quality_pages"] == expected["pages"]
    assert reported["suspect_pages"] == expected["suspect_pages"]
    assert reported["suspect_share"] == pytest.approx(expected["suspect_share"], abs=1e-4)
    counted = {name: entry["pages"] for name, entry in reported["reasons"].items() if entry["pages"]}
    assert counted == expected["reasons"]
    for name, entry in reported["reasons"].items():
        assert entry["share"] == pytest.approx(entry["pages"] / expected["pages"], abs=1e-4), name
    for key in ("agreement_mean", "agreement_worst"):
        wanted = expected[key]
        assert reported[key] == (None if wanted is None else pytest.approx(wanted, abs=1e-4)), key
    assert reported["retries"] == expected["retries"]


def test_eval_reports_what_the_results_say_per_document_and_in_total(make_server, tmp_path):
    # Sequences are scripted in order (one document at a time, one page per batch): report.pdf's
    # page 1 reads well, its page 2 runs away on the first attempt and on the retry; the photo
    # then gets the first answer again.
    server = make_server(
        answers=[ANSWER_WELL, RUNAWAY, RUNAWAY],
        ds_max_new_tokens=300,
        ds_batch_size=1,
        page_retries=1,
    )
    (tmp_path / "report.pdf").write_bytes(text_pdf(READ_WELL, READ_BADLY))
    (tmp_path / "photo.png").write_bytes(png_bytes())
    (tmp_path / "broken.pdf").write_bytes(CORRUPT_PDF)

    ran = dsocr("eval", "report.pdf", "photo.png", "-j", "1", "--json", url=server.url, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["ok"] is True
    by_name = {Path(d["path"]).name: d for d in report["documents"]}
    results = {
        name: server.client.get(f"/v1/tasks/{d['task_id']}/result.json").json() for name, d in by_name.items()
    }
    pdf_pages = results["report.pdf"]["pages"]
    assert pdf_pages[1]["quality"]["suspect"] is True  # the run is what the test means it to be
    assert pdf_pages[1]["quality"]["attempts"] == 2
    assert pdf_pages[0]["quality"]["text_layer_agreement"] > 0.9
    assert results["photo.png"]["pages"][0]["quality"]["text_layer_agreement"] is None
    for name, document in by_name.items():
        assert document["status"] == "succeeded"
        assert_figures(document, expected_figures(results[name]["pages"]))
        assert document["seconds"] == results[name]["duration_seconds"]
        assert document["pages_per_second"] == pytest.approx(
            len(results[name]["pages"]) / results[name]["duration_seconds"], abs=1e-3
        )
    every_page = [page for result in results.values() for page in result["pages"]]
    summary = report["total"]
    assert_figures(summary, expected_figures(every_page))
    assert (summary["documents"], summary["succeeded"], summary["failed"]) == (2, 2, 0)
    assert summary["pages_per_second"] == pytest.approx(summary["pages"] / summary["seconds"], abs=1e-3)
    assert summary["reasons"]["no_end_marker"] == {"pages": 1, "share": pytest.approx(1 / 3, abs=1e-4)}

    # The table, with a document that fails: exit 1, the failure named, the totals of the others.
    table = dsocr("eval", "report.pdf", "broken.pdf", "-j", "1", url=server.url, cwd=tmp_path)
    assert table.returncode == 1, table.stderr
    lines = table.stdout.splitlines()
    broken = next(line for line in lines if "broken.pdf" in line)
    assert "failed" in broken
    assert "invalid_document" in broken
    report_row = next(line for line in lines if "report.pdf" in line).split("│")
    cells = [cell.strip() for cell in report_row]
    tasks = server.client.get("/v1/tasks").json()["tasks"]  # newest first
    latest = next(task for task in tasks if task["source"]["filename"] == "report.pdf")
    again = expected_figures(server.client.get(f"/v1/tasks/{latest['task_id']}/result.json").json()["pages"])
    assert again["suspect_pages"] >= 1
    assert cells[3] == "2"  # pages
    assert cells[5] == f"{again['suspect_pages']} ({again['suspect_share']:.0%})"
    reasons = [
        f"{name} {again['reasons'][name] / 2:.0%}" for name in SUSPECT_REASONS if name in again["reasons"]
    ]
    assert cells[6] == ", ".join(reasons)
    assert cells[7] == f"{again['agreement_mean']:.3f}"
    assert cells[8] == f"{again['agreement_worst']:.3f}"
    assert cells[9] == str(again["retries"])
    total_row = [cell.strip() for cell in next(line for line in lines if "total" in line).split("│")]
    assert total_row[2] == "1/2 succeeded"


def test_eval_usage_errors_exit_2(tmp_path):
    missing = dsocr("eval", "nothing-here/*.pdf", url="http://127.0.0.1:9", cwd=tmp_path)
    assert missing.returncode == 2
    assert "no documents found" in missing.stderr
    assert dsocr("eval", "--resolution", "huge", ".", url="http://127.0.0.1:9", cwd=tmp_path).returncode == 2
    shown = dsocr("eval", "--help", url="http://127.0.0.1:9", cwd=tmp_path)
    assert shown.returncode == 0
    assert '"suspect_share"' in shown.stdout  # the --json shape is documented in the help
    assert "Exit 0 when every document ran, 1 when any failed" in shown.stdout
