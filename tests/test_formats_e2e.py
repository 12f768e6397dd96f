"""chunks.json, result.html and result.docx as a user gets them: from a real server that converted
a PDF with the tiny model, through the routes, the zip and share links."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import docx
import httpx
import pytest
from huggingface_hub import constants

from app.formats.html import CONTENT_SECURITY_POLICY
from tests.documents import PICTURE_RECT, make_pdf, norm_box
from tests.servers import wait_for
from tests.tiny_model import build_tiny_tokenizer

DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
TOKENIZER = "local/tiny-tokenizer"  # a Hub repository id, present only in the test's cache
PARAGRAPH = "Revenue grew by twelve percent. Costs rose more slowly than revenue did."
PAGE_1 = (
    "<|ref|>title<|/ref|><|det|>[[100, 60, 700, 100]]<|/det|>\n# Annual Report\n\n"
    f"<|ref|>text<|/ref|><|det|>[[100, 120, 900, 180]]<|/det|>\n{PARAGRAPH}\n\n"
    "<|ref|>table<|/ref|><|det|>[[100, 200, 600, 300]]<|/det|>\n"
    "<table><tr><td>Year</td><td>Revenue</td></tr><tr><td>2023</td><td>1.2</td></tr></table>\n\n"
    "<|ref|>equation<|/ref|><|det|>[[300, 320, 600, 360]]<|/det|>\n\\[ E = m c^{2} \\]"
)
PAGE_2 = (
    f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[160, 600, 700, 620]]<|/det|>\nFigure 1: Revenue.\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 700, 900, 740]]<|/det|>\n"
    'Note <script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"> end.'
)
EXPORTS = ("chunks.json", "result.html", "result.docx")


@pytest.fixture(scope="module")
def cached_tokenizer() -> str:
    """A tokenizer in the suite's Hugging Face cache (conftest points HF_HOME at a temp folder), laid
    out as huggingface_hub writes it: where the server looks up ``tokenizer=``. Its repository id."""
    repo = Path(constants.HF_HUB_CACHE) / "models--local--tiny-tokenizer"
    commit = "0123456789abcdef0123456789abcdef01234567"
    build_tiny_tokenizer().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return TOKENIZER


def submit(client: httpx.Client) -> str:
    upload = client.post("/v1/tasks/upload", files={"file": ("report.pdf", make_pdf(2, picture_page=2))})
    assert upload.status_code == 202, upload.text
    return upload.json()["task_id"]


def wait_succeeded(client: httpx.Client, task_id: str) -> dict:
    view = wait_for(lambda: _final(client, task_id), timeout=60)
    assert view["status"] == "succeeded", view
    assert view["truncated_pages"] == []
    return view


def _final(client: httpx.Client, task_id: str) -> dict | None:
    view = client.get(f"/v1/tasks/{task_id}").json()
    return view if view["status"] in ("succeeded", "failed", "canceled") else None


def test_the_exports_are_served_once_the_task_succeeded_to_its_owner(make_server, cached_tokenizer):
    server = make_server(
        answers=[PAGE_1, PAGE_2],
        page_delay=0.5,
        api_keys="sk_test,sk_other",
        ds_max_new_tokens=1024,
    )
    client = server.client
    task_id = submit(client)
    base = f"/v1/tasks/{task_id}"
    for name in EXPORTS:
        early = client.get(f"{base}/{name}")
        assert early.status_code == 409, (name, early.text)
        assert early.json()["error"]["code"] == "task_not_finished"
    view = wait_succeeded(client, task_id)
    assert {key: view["links"][key] for key in ("chunks", "html", "docx")} == {
        "chunks": f"{base}/chunks.json",
        "html": f"{base}/result.html",
        "docx": f"{base}/result.docx",
    }
    full_md = client.get(f"{base}/result.md").text

    # chunks.json: the texts join back into result.md; every chunk cites its pages and boxes.
    response = client.get(view["links"]["chunks"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    chunk_set = response.json()
    assert (chunk_set["tokenizer"], chunk_set["max_tokens"], chunk_set["overlap"]) == ("chars", 512, 0)
    chunks = chunk_set["chunks"]
    assert "\n\n".join(chunk["text"] for chunk in chunks) + "\n" == full_md
    layout = client.get(f"{base}/layout.json").json()
    for chunk in chunks:
        assert chunk["blocks"], chunk
        for block in chunk["blocks"]:
            stored = layout["pages"][block["index"]]["blocks"][block["block"]]
            assert block["bbox"] == stored["bbox"]
            assert block["bbox_pt"] == stored["bbox_pt"]
            assert len(block["bbox_pt"]) == 4
    figures = [figure for chunk in chunks for figure in chunk["figures"]]
    assert [(f["link"], f["caption"]) for f in figures] == [
        (f"{base}/images/p0002_01.png", "Figure 1: Revenue.")
    ]
    assert client.get(figures[0]["link"]).headers["content-type"] == "image/png"

    # A tokenizer from the server's Hugging Face cache counts the tokens.
    counted = client.get(view["links"]["chunks"], params={"tokenizer": cached_tokenizer, "max_tokens": 20})
    assert counted.status_code == 200, counted.text
    tokenizer = build_tiny_tokenizer()
    assert counted.json()["tokenizer"] == TOKENIZER
    for chunk in counted.json()["chunks"]:
        assert chunk["tokens"] == len(tokenizer.encode(chunk["text"], add_special_tokens=False))
    assert len(counted.json()["chunks"]) > len(chunks)

    # Bad limits and unknown tokenizers are refused with an error body, before any chunk is sent.
    for params, status in (
        ({"max_tokens": 0}, 422),
        ({"max_tokens": 10, "overlap": 10}, 422),
        ({"overlap": -1}, 422),
        ({"tokenizer": "local/not-cached"}, 422),
        ({"tokenizer": "../../etc/passwd"}, 422),
    ):
        refused = client.get(view["links"]["chunks"], params=params)
        assert refused.status_code == status, (params, refused.text)
        assert set(refused.json()["error"]) == {"code", "message"}

    # result.html: one page, figure inlined, nothing that runs, and a policy that says so.
    page = client.get(view["links"]["html"])
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == f"{CONTENT_SECURITY_POLICY}; sandbox"
    assert "<script" not in page.text.lower()
    assert "onerror" not in page.text.lower()
    assert "Annual Report</h1>" in page.text
    assert page.text.count('src="data:image/png;base64,') == 1
    assert "<math" in page.text
    assert "<table>" in page.text

    # result.docx: python-docx reads back the headings, the table and the figure.
    word_file = client.get(view["links"]["docx"])
    assert word_file.status_code == 200
    assert word_file.headers["content-type"] == DOCX_TYPE
    assert word_file.headers["content-disposition"] == f'attachment; filename="{task_id}.docx"'
    word = docx.Document(io.BytesIO(word_file.content))
    assert [p.text for p in word.paragraphs if p.style.name.startswith("Heading")] == ["Annual Report"]
    assert PARAGRAPH in [p.text for p in word.paragraphs]
    assert [[cell.text for cell in row.cells] for row in word.tables[0].rows] == [
        ["Year", "Revenue"],
        ["2023", "1.2"],
    ]
    assert len(word.inline_shapes) == 1
    assert not list(server.data_dir.joinpath("spool").iterdir())  # the DOCX's file is gone

    # Another key's task is not there at all.
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer sk_other"}) as other:
        for name in EXPORTS:
            hidden = other.get(f"{base}/{name}")
            assert hidden.status_code == 404, name
            assert hidden.json()["error"]["code"] == "task_not_found"


def test_the_zip_and_share_links_carry_the_exports(make_server):
    server = make_server(answers=[PAGE_1, PAGE_2], ds_max_new_tokens=1024, link_secret="s" * 32)
    client = server.client
    task_id = submit(client)
    wait_succeeded(client, task_id)
    base = f"/v1/tasks/{task_id}"

    with zipfile.ZipFile(io.BytesIO(client.get(f"{base}/result.zip").content)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == [
            "full.md",
            "layout.json",
            "result.json",
            *EXPORTS,
            "images/p0002_01.png",
        ]
        assert archive.getinfo("result.docx").compress_type == zipfile.ZIP_STORED
        assert archive.read("result.html") == client.get(f"{base}/result.html").content
        chunks = json.loads(archive.read("chunks.json"))["chunks"]
        # In the zip, a figure's link is the crop's path beside chunks.json.
        assert [f["link"] for c in chunks for f in c["figures"]] == ["images/p0002_01.png"]
        assert [c["text"] for c in chunks] == [
            c["text"] for c in client.get(f"{base}/chunks.json").json()["chunks"]
        ]
        word = docx.Document(io.BytesIO(archive.read("result.docx")))
        assert "Annual Report" in [p.text for p in word.paragraphs]

    link = client.post(f"{base}/links", json={"file": "result.docx", "expires_in": 600})
    assert link.status_code == 201, link.text
    with httpx.Client(base_url=server.url) as anonymous:
        shared = anonymous.get(link.json()["url"])
        assert shared.status_code == 200
        assert shared.headers["content-type"] == DOCX_TYPE
        assert len(docx.Document(io.BytesIO(shared.content)).inline_shapes) == 1
        assert shared.headers["content-disposition"] == f'attachment; filename="{task_id}.docx"'
        # A shared page keeps its sandbox: it opens on this service's origin, beside the console.
        html_link = client.post(f"{base}/links", json={"file": "result.html"}).json()["url"]
        page = anonymous.get(html_link)
        assert page.status_code == 200
        assert page.headers["content-security-policy"] == f"{CONTENT_SECURITY_POLICY}; sandbox"
        assert page.content == client.get(f"{base}/result.html").content
