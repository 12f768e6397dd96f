"""The ``dsocr`` command as a subprocess against a real server: a folder, a re-run, JSON, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.documents import make_pdf, png_bytes
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
