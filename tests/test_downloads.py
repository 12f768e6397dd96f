"""The streamed zip and share links, through HTTP against a real server."""

from __future__ import annotations

import io
import time
import zipfile
from urllib.parse import parse_qs, urlsplit

import httpx

from app.storage.links import LinkSigner
from tests.documents import PICTURE_RECT, make_pdf, norm_box
from tests.servers import wait_for

LINK_SECRET = "link-secret-for-tests-0123456789"
PAGE_1 = "<|ref|>title<|/ref|><|det|>[[120, 60, 600, 100]]<|/det|>\n# A heading\n\nSome text."
PAGE_2 = f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n"


def succeeded(client: httpx.Client, pages: int = 2) -> str:
    """Upload a PDF whose last page holds a picture and wait until it succeeded; its task id."""
    task_id = client.post(
        "/v1/tasks/upload", files={"file": ("paper.pdf", make_pdf(pages, picture_page=pages))}
    ).json()["task_id"]
    wait_for(lambda: client.get(f"/v1/tasks/{task_id}").json()["status"] == "succeeded", timeout=60)
    return task_id


def test_zip_is_streamed_with_every_result(make_server):
    server = make_server(answers=[PAGE_1, PAGE_2])
    client = server.client
    task_id = succeeded(client)
    view = client.get(f"/v1/tasks/{task_id}").json()
    assert view["links"]["zip"] == f"/v1/tasks/{task_id}/result.zip"

    with client.stream("GET", view["links"]["zip"]) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert response.headers["content-disposition"] == f'attachment; filename="{task_id}.zip"'
        # Streamed as it is built: no length known up front, the body arrives in chunks.
        assert "content-length" not in response.headers
        assert response.headers["transfer-encoding"] == "chunked"
        body = response.read()

    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == [
            "full.md",
            "layout.json",
            "result.json",
            "chunks.json",  # the exports, built as the zip streams (tests/test_formats_e2e.py)
            "result.html",
            "result.docx",
            "images/p0002_01.png",
        ]
        assert archive.read("full.md") == client.get(f"/v1/tasks/{task_id}/result.md").content
        assert archive.read("layout.json") == client.get(f"/v1/tasks/{task_id}/layout.json").content
        assert archive.read("result.json") == client.get(f"/v1/tasks/{task_id}/result.json").content
        image = client.get(f"/v1/tasks/{task_id}/images/p0002_01.png").content
        assert archive.read("images/p0002_01.png") == image
        assert archive.getinfo("images/p0002_01.png").compress_type == zipfile.ZIP_STORED
        assert archive.getinfo("full.md").compress_type == zipfile.ZIP_DEFLATED
        assert "# A heading" in archive.read("full.md").decode()

    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get(view["links"]["zip"]).status_code == 401
    missing = client.get(f"/v1/tasks/{'0' * 32}/result.zip")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "task_not_found"


def test_share_links_grant_one_file_without_a_key(make_server):
    server = make_server(answers=[PAGE_1, PAGE_2], link_secret=LINK_SECRET)
    client = server.client
    task_id = succeeded(client)
    other_task = succeeded(client, pages=1)

    created = client.post(f"/v1/tasks/{task_id}/links", json={"file": "full.md", "expires_in": 600})
    assert created.status_code == 201, created.text
    link = created.json()
    assert link["file"] == "full.md"
    assert link["url"].startswith(f"/v1/shared/{task_id}/full.md?")
    assert abs(_expires(link["url"]) - (time.time() + 600)) < 5

    with httpx.Client(base_url=server.url) as anonymous:
        shared = anonymous.get(link["url"])
        assert shared.status_code == 200
        assert shared.headers["content-type"] == "text/markdown; charset=utf-8"
        assert shared.content == client.get(f"/v1/tasks/{task_id}/result.md").content

        # Exactly that file of that task: any change to the link breaks its signature.
        path, query = link["url"].split("?")
        expires = _expires(link["url"])
        tampered = [
            path.replace("full.md", "layout.json") + "?" + query,
            path.replace(task_id, other_task) + "?" + query,
            link["url"].replace(f"expires={expires}", f"expires={expires + 3600}"),
            link["url"][:-1] + ("0" if link["url"][-1] != "0" else "1"),
            path,
            path + f"?expires={expires}",
            f"/v1/shared/{task_id}/../{task_id}/task.json?" + query,
        ]
        for url in tampered:
            refused = anonymous.get(url)
            assert refused.status_code in (403, 404), url
            assert set(refused.json()["error"]) == {"code", "message"}, url
        assert anonymous.get(path.replace("full.md", "layout.json") + "?" + query).json()["error"] == {
            "code": "link_invalid",
            "message": "the share link's signature does not match; ask for a new link",
        }
        # The signature is no key: every other route still wants one.
        assert anonymous.get(f"/v1/tasks/{task_id}?{query}").status_code == 401

        # An expired link, signed with the right secret, is refused as expired.
        signer = LinkSigner(LINK_SECRET.encode())
        expired = anonymous.get(signer.path(task_id, "full.md", int(time.time()) - 1))
        assert expired.status_code == 403
        assert expired.json()["error"]["code"] == "link_expired"

        # A correctly signed link to a task that is gone is a 404, not a 500.
        gone = anonymous.get(signer.path("f" * 32, "full.md", int(time.time()) + 60))
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "task_not_found"

        # Images, the zip, and Markdown by its route's name (GET .../result.md) can be shared too.
        for name, content_type in (
            ("result.md", "text/markdown; charset=utf-8"),
            ("images/p0002_01.png", "image/png"),
            ("result.zip", "application/zip"),
        ):
            url = client.post(f"/v1/tasks/{task_id}/links", json={"file": name}).json()["url"]
            assert abs(_expires(url) - (time.time() + 3600)) < 5  # APP_LINK_EXPIRE_SECONDS
            assert url.startswith(f"/v1/shared/{task_id}/{name}?")
            fetched = anonymous.get(url)
            assert fetched.status_code == 200, name
            assert fetched.headers["content-type"] == content_type
            if name == "result.md":
                assert fetched.content == client.get(f"/v1/tasks/{task_id}/result.md").content
        with zipfile.ZipFile(io.BytesIO(fetched.content)) as archive:
            assert "images/p0002_01.png" in archive.namelist()

        # With the local backend, "publish" hands out such links for every file at once.
        published = client.post(f"/v1/tasks/{task_id}/publish")
        assert published.status_code == 200, published.text
        state = published.json()
        assert state["backend"] == "local"
        assert state["status"] == "succeeded"
        assert anonymous.get(state["links"]["layout.json"]).json()["version"] == 1
        assert client.get(f"/v1/tasks/{task_id}").json()["publish"] == state

    for body, status, code in (
        ({"file": "task.json"}, 404, "result_not_found"),
        ({"file": "images/../task.json"}, 404, "result_not_found"),
        ({"file": "images/p0009_01.png"}, 404, "result_not_found"),
        ({"file": "full.md", "expires_in": 10**9}, 422, "invalid_options"),
        ({"file": "full.md", "expires_in": 0}, 422, "invalid_request"),
    ):
        refused = client.post(f"/v1/tasks/{task_id}/links", json=body)
        assert refused.status_code == status, body
        assert refused.json()["error"]["code"] == code, body


def _expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["expires"][0])
