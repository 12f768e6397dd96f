"""End to end through HTTP: a real uvicorn server, the tiny DeepSeek-OCR-2 and real files."""

from __future__ import annotations

import io
import json
import re

import httpx
import pytest
from PIL import Image

from tests.documents import PICTURE_RECT, huge_page_pdf, make_pdf, norm_box, png_bytes, png_declaring
from tests.servers import wait_for
from tests.sse import events_path

PAGE_1 = (
    "<|ref|>title<|/ref|><|det|>[[120, 60, 600, 100]]<|/det|>\n# Page 1 heading\n\n"
    "<|ref|>text<|/ref|><|det|>[[120, 110, 700, 140]]<|/det|>\nBody text of page 1."
)
PAGE_2 = (
    "<|ref|>table<|/ref|><|det|>[[100, 200, 900, 400]]<|/det|>\n"
    "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>\n\n"
    "<|ref|>equation<|/ref|><|det|>[[100, 450, 900, 500]]<|/det|>\n\\[E = mc^2\\]"
)
PAGE_3 = (
    f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[168, 600, 672, 630]]<|/det|>\nFigure 1: a red square."
)


def finished(client: httpx.Client, task_id: str) -> dict:
    def poll() -> dict | None:
        view = client.get(f"/v1/tasks/{task_id}").json()
        return view if view["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(poll, timeout=120)


def upload(client: httpx.Client, data: bytes, name: str = "paper.pdf", **fields: str) -> httpx.Response:
    return client.post("/v1/tasks/upload", files={"file": (name, data)}, data=fields)


def test_pdf_converts_to_markdown_layout_and_figures(make_server):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3])
    client = server.client

    response = upload(client, make_pdf(3))
    assert response.status_code == 202
    view = response.json()
    assert view["status"] == "queued"
    assert view["source"] == {
        "filename": "paper.pdf",
        "content_type": "application/pdf",
        "size_bytes": view["source"]["size_bytes"],
        "pages": 3,
        "url": None,
    }
    assert view["progress"] == {"pages_done": 0, "pages_total": 3}

    done = finished(client, view["task_id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"pages_done": 3, "pages_total": 3}
    assert done["truncated_pages"] == []

    markdown = client.get(done["links"]["markdown"])
    assert markdown.status_code == 200
    assert markdown.headers["content-type"].startswith("text/markdown")
    text = markdown.text
    assert "# Page 1 heading" in text
    assert "Body text of page 1." in text
    assert "<table><tr><td>a</td><td>b</td></tr>" in text
    assert "\\[E = mc^2\\]" in text
    assert "![](images/p0003_01.png)" in text
    assert "Figure 1: a red square." in text
    assert "<|ref|>" not in text
    assert "<|det|>" not in text
    assert "end▁of▁sentence" not in text
    assert text.index("Page 1 heading") < text.index("<table>") < text.index("images/p0003_01.png")

    layout = client.get(done["links"]["layout"]).json()
    assert [page["page"] for page in layout["pages"]] == [1, 2, 3]
    picture_page = layout["pages"][2]
    assert (picture_page["width"], picture_page["height"], picture_page["dpi"]) == (1190, 1684, 144)
    image_block = next(block for block in picture_page["blocks"] if block["type"] == "image")
    assert image_block["bbox_norm"] == norm_box(PICTURE_RECT)
    x0, y0, x1, y1 = image_block["bbox"]
    assert abs(x0 - 200) <= 3
    assert abs(y0 - 400) <= 3
    assert abs(x1 - 800) <= 3
    assert abs(y1 - 1000) <= 3
    assert [b["type"] for b in layout["pages"][1]["blocks"]] == ["table", "equation"]

    result = client.get(done["links"]["json"]).json()
    assert result["task_id"] == view["task_id"]
    assert result["status"] == "succeeded"
    assert [page["page"] for page in result["pages"]] == [1, 2, 3]
    assert "Body text of page 1." in result["pages"][0]["markdown"]

    assert done["links"]["images"] == [f"/v1/tasks/{view['task_id']}/images/p0003_01.png"]
    crop = client.get(done["links"]["images"][0])
    assert crop.status_code == 200
    assert crop.headers["content-type"] == "image/png"
    figure = Image.open(io.BytesIO(crop.content))
    assert abs(figure.width - 600) <= 6
    assert abs(figure.height - 600) <= 6
    assert figure.convert("RGB").getpixel((figure.width // 2, figure.height // 2)) == (200, 30, 30)

    # The rendered pages, as the console shows them under their boxes.
    for page in layout["pages"]:
        preview = client.get(f"/v1/tasks/{view['task_id']}/pages/{page['page']}")
        assert preview.status_code == 200
        assert preview.headers["content-type"] == "image/webp"
        shown = Image.open(io.BytesIO(preview.content))
        assert shown.format == "WEBP"
        assert max(shown.size) <= 1600
        assert abs(shown.width / shown.height - page["width"] / page["height"]) < 0.01
    scale = shown.width / picture_page["width"]
    red = shown.convert("RGB").getpixel((int(500 * scale), int(700 * scale)))  # the figure's centre
    assert red[0] > 150
    assert red[1] < 80
    missing = client.get(f"/v1/tasks/{view['task_id']}/pages/4")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "result_not_found"


def test_images_and_page_selection(make_server):
    server = make_server(answers=[PAGE_1])
    tiff = io.BytesIO()
    frames = [Image.new("RGB", (400, 300), c) for c in ("white", "gray")]
    frames[0].save(tiff, format="TIFF", save_all=True, append_images=frames[1:])
    for name, data, pages in (("scan.tiff", tiff.getvalue(), 2), ("photo.png", png_bytes(), 1)):
        view = upload(server.client, data, name).json()
        assert view["source"]["pages"] == pages
        assert finished(server.client, view["task_id"])["progress"]["pages_done"] == pages

    view = upload(server.client, make_pdf(5, picture_page=None), pages="2-3,5").json()
    assert view["pages"] == [2, 3, 5]
    done = finished(server.client, view["task_id"])
    pages = server.client.get(done["links"]["layout"]).json()["pages"]
    assert [page["page"] for page in pages] == [2, 3, 5]


@pytest.mark.parametrize(
    ("name", "data", "fields", "status", "code"),
    [
        ("notes.txt", b"just some text, not a document", {}, 415, "unsupported_media_type"),
        ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\n%%EOF garbage", {}, 422, "invalid_document"),
        ("empty.pdf", b"", {}, 422, "invalid_document"),
        ("paper.pdf", None, {"pages": "9"}, 422, "invalid_options"),
        ("paper.pdf", None, {"pages": "3-1"}, 422, "invalid_options"),
        ("paper.pdf", None, {"mode": "poetry"}, 422, "invalid_options"),
        ("paper.pdf", None, {"options": "{not json"}, 422, "invalid_options"),
        ("paper.pdf", None, {"dpi": "5000"}, 422, "invalid_options"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(make_server, name, data, fields, status, code):
    server = make_server(answers=[PAGE_1])
    response = upload(server.client, make_pdf(2) if data is None else data, name, **fields)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert server.task_dirs() == []
    assert server.spool_files() == []


def test_oversize_upload_is_refused_before_it_is_stored(make_server):
    server = make_server(answers=[PAGE_1], max_upload_mb=1)
    big = make_pdf(1) + b"\n%" + b"x" * (2 * 1024 * 1024)
    response = upload(server.client, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert server.task_dirs() == []
    assert server.spool_files() == []
    upload(server.client, b"plain text", "notes.txt")
    metrics = server.client.get("/metrics").text
    assert 'dsocr_tasks_rejected_total{code="payload_too_large"} 1.0' in metrics
    assert 'dsocr_tasks_rejected_total{code="unsupported_media_type"} 1.0' in metrics


def test_api_keys_guard_every_task_route(make_server):
    server = make_server(answers=[PAGE_1], api_keys="sk_one, sk_two")
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer sk_wrong"}, {"Authorization": "Basic c2tfb25lOg=="}):
            response = anonymous.post(
                "/v1/tasks/upload", files={"file": ("a.pdf", make_pdf(1))}, headers=headers
            )
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"
            assert anonymous.get("/v1/tasks/" + "0" * 32, headers=headers).status_code == 401
        for key in ("sk_one", "sk_two"):
            ok = anonymous.post(
                "/v1/tasks/upload",
                files={"file": ("a.pdf", make_pdf(1))},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert ok.status_code == 202
    assert server.task_dirs() != []


def test_errors_share_one_shape(make_server):
    server = make_server(answers=[PAGE_1])
    client = server.client
    for path in (
        "/v1/tasks/" + "a" * 32,
        "/v1/tasks/../../etc/passwd",
        "/v1/tasks/nope/result.md",
        "/nowhere",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"code", "message"}
    view = upload(client, make_pdf(1)).json()
    done = finished(client, view["task_id"])
    for bad in ("../task.json", "p0001_01.png.exe", "x.png", "p0009_01.png"):
        response = client.get(f"/v1/tasks/{done['task_id']}/images/{bad}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] in (
            "result_not_found",
            "not_found",
        )
    assert client.post("/v1/tasks", json={"url": "notaurl"}).json()["error"]["code"] == "invalid_request"
    assert client.delete(f"/v1/tasks/{done['task_id']}").status_code == 409


def test_openapi_documents_the_api(make_server):
    server = make_server(answers=[PAGE_1])
    # Swagger UI and ReDoc load their script from the service itself, never from another origin.
    for page, assets in (
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
        ("/redoc", ("redoc.standalone.js",)),
    ):
        html = server.client.get(page)
        assert html.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
        assert sources, page
        assert all(source.startswith("/") for source in sources), sources
        for asset in assets:
            assert f"/docs-assets/{asset}" in sources
            fetched = server.client.get(f"/docs-assets/{asset}")
            assert fetched.status_code == 200
            assert len(fetched.content) > 10_000
    spec = server.client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/tasks/upload"]["post"]["requestBody"]["content"]
    for path in (
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/result.md",
        "/v1/tasks/{task_id}/result.json",
        "/v1/tasks/{task_id}/images/{name}",
        "/healthz",
        "/metrics",
    ):
        assert path in spec["paths"], path


def test_metrics_count_tasks_by_route_template(make_server):
    server = make_server(answers=[PAGE_1])
    view = upload(server.client, make_pdf(2, picture_page=None)).json()
    finished(server.client, view["task_id"])
    assert server.client.get("/ui/app.js").status_code == 200
    assert server.client.get(f"/v1/tasks/{view['task_id']}?wait=5").status_code == 200  # a long-poll
    with server.client.stream("GET", events_path(view["task_id"])) as stream:
        assert stream.status_code == 200
    text = server.client.get("/metrics").text
    assert 'dsocr_tasks_finished_total{status="succeeded"} 1.0' in text
    assert "dsocr_task_duration_seconds_bucket" in text
    assert "dsocr_page_duration_seconds_count 2.0" in text
    assert "dsocr_model_loaded 1.0" in text
    assert "dsocr_model_load_seconds_count 1.0" in text
    assert re.search(
        r'dsocr_http_requests_total\{method="GET",route="/v1/tasks/\{task_id\}",status="200"\}', text
    )
    assert 'dsocr_http_requests_total{method="GET",route="/ui",status="200"} 1.0' in text  # the mount
    assert 'dsocr_queue_depth{role="all"} 0.0' in text
    assert "dsocr_tasks_running 0.0" in text
    # Streams and long-polls are counted, but their time is no latency: the histogram leaves them out.
    assert 'route="/v1/tasks/{task_id}/events",status="200"} 1.0' in text
    assert (
        'dsocr_http_request_duration_seconds_count{method="GET",route="/v1/tasks/{task_id}/events"}'
        not in text
    )
    polls = re.search(
        r'dsocr_http_requests_total\{method="GET",route="/v1/tasks/\{task_id\}",status="200"\} (\d+)', text
    )
    observed = re.search(
        r'dsocr_http_request_duration_seconds_count\{method="GET",route="/v1/tasks/\{task_id\}"\} (\d+)', text
    )
    assert polls is not None
    assert observed is not None
    assert float(observed[1]) == float(polls[1]) - 1  # all the plain reads, not the ?wait= one
    assert view["task_id"] not in text


def test_result_json_round_trips(make_server):
    server = make_server(answers=[PAGE_2])
    view = upload(server.client, make_pdf(1, picture_page=None)).json()
    done = finished(server.client, view["task_id"])
    body = server.client.get(done["links"]["json"])
    assert body.headers["content-type"] == "application/json"
    result = json.loads(body.content)
    assert result["pages"][0]["blocks"][0]["type"] == "table"
    assert result["pages"][0]["truncated"] is False


def test_pages_that_never_finish_are_kept_cut_and_flagged(make_server):
    looping = "<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\nIntro.\n" + "the same row again\n" * 60
    long_text = "<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\nWords without end: " + " ".join(
        f"w{n}" for n in range(200)
    )
    server = make_server(answers=[looping, long_text], ds_max_new_tokens=160, ds_batch_size=1)
    view = upload(server.client, make_pdf(2, picture_page=None)).json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "succeeded"
    assert done["truncated_pages"] == [1, 2]

    result = server.client.get(done["links"]["json"]).json()
    reasons = [(page["truncated"], page["truncated_reason"]) for page in result["pages"]]
    assert reasons == [(True, "repetition"), (True, "max_tokens")]
    markdown = server.client.get(done["links"]["markdown"]).text
    assert "Intro." in markdown
    assert markdown.count("the same row again") == 1
    assert "Words without end" in markdown
    layout = server.client.get(done["links"]["layout"]).json()
    assert [page["truncated"] for page in layout["pages"]] == [True, True]


def test_bombs_are_refused_or_rendered_within_the_pixel_limit(make_server):
    server = make_server(answers=[PAGE_1], max_page_pixels=4_000_000)
    bomb = upload(server.client, png_declaring(60_000, 60_000), "bomb.png")
    assert bomb.status_code == 422
    assert bomb.json()["error"]["code"] == "invalid_document"
    assert server.task_dirs() == []

    view = upload(server.client, huge_page_pdf()).json()
    done = finished(server.client, view["task_id"])
    assert done["status"] == "succeeded"
    page = server.client.get(done["links"]["layout"]).json()["pages"][0]
    assert page["width"] * page["height"] <= 4_000_000
    assert page["dpi"] < 144


def test_a_status_read_is_the_task_view_the_upload_answered(make_server):
    # The 202 is FastAPI's own serialisation of TaskView; a status read (served pre-serialised,
    # polled the most) must be the same document: the same keys, by their aliases, as JSON.
    server = make_server(answers=[PAGE_1])
    client = server.client
    created = upload(client, make_pdf(1, picture_page=None)).json()

    read = client.get(f"/v1/tasks/{created['task_id']}")
    assert read.status_code == 200
    assert read.headers["content-type"] == "application/json"
    assert read.json().keys() == created.keys()
    assert read.json()["task_id"] == created["task_id"]

    ended = client.get(f"/v1/tasks/{created['task_id']}", params={"wait": 60})
    assert ended.status_code == 200
    assert ended.json().keys() == created.keys()
    assert ended.json()["status"] == "succeeded"
    assert ended.json()["progress"] == {"pages_done": 1, "pages_total": 1}
