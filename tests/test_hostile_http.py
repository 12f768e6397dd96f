"""Hostile HTTP against a real service: giant, deep and malformed requests, as an attacker sends them.

Giant bodies are generators, so this process never holds them; the server's memory is read from
``/proc/<pid>/status`` while they are sent. Every answer must be a 4xx in the one error shape, the
service must keep answering ``/healthz``, and nothing may stay behind in the upload spool.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from app.api.body_limits import MAX_JSON_DEPTH, json_nesting_exceeds
from app.records import TaskOptions
from tests.documents import make_pdf
from tests.servers import ProcessServer
from tests.test_api_e2e import PAGE_1, finished, upload

MIB = 2**20
GIANT = 300 * MIB  # what the attack in issue 14 sent
KEY = "sk_hostile"
TASK_ID = "0" * 32  # well formed, no such task
# The head of a multipart upload whose file part then runs on for as long as the body does.
UPLOAD_HEAD = (
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.pdf"\r\n'
    b"Content-Type: application/pdf\r\n\r\n%PDF-1.4\n"
)
UPLOAD_TYPE = "multipart/form-data; boundary=b"


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` now, from the kernel (no psutil)."""
    match = re.search(r"^VmRSS:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


class PeakRss:
    """Samples the resident memory of ``pid`` every few ms while the block runs; ``growth`` is the
    highest sample above the one taken on entry. (Sampling, not VmHWM: the high-water mark may be
    from start-up, and resetting it through clear_refs is not allowed everywhere.)"""

    def __init__(self, pid: int, interval: float = 0.003) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = rss_bytes(self._pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._pid))

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_bytes(self._pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def giant(size: int = GIANT, head: bytes = b"", chunk: int = MIB) -> Iterator[bytes]:
    """``head``, then spaces up to ``size`` bytes, made a chunk at a time as the client sends them."""
    yield head
    for _ in range(size // chunk):
        yield b" " * chunk


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


# --- giant bodies, against a service in its own process (its memory is its own) ----------------


@dataclass
class Service:
    """``python -m app`` in its own process, and where it keeps its data."""

    server: ProcessServer
    data_dir: Path

    @property
    def pid(self) -> int:
        assert self.server.process is not None
        return self.server.process.pid

    def rejected_too_large(self) -> float:
        """``dsocr_tasks_rejected_total{code="payload_too_large"}``: refused submissions so far."""
        with httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
            metrics = client.get("/metrics").text
        match = re.search(
            r'^dsocr_tasks_rejected_total\{code="payload_too_large"\} (\S+)$', metrics, re.MULTILINE
        )
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("hostile")
    env = {
        "APP_DATA_DIR": str(root / "data"),
        "APP_API_KEYS": KEY,
        "APP_FORCE_CPU": "true",
        "APP_MAX_UPLOAD_MB": "1",
        "APP_LOG_LEVEL": "warning",
    }
    server = ProcessServer(env, root / "server.log").start(timeout=120)
    yield Service(server, root / "data")
    server.stop()


GIANT_TARGETS = [  # (path, Content-Type): every route that reads a body, with each kind it reads
    ("/v1/tasks", "application/json"),
    (f"/v1/tasks/{TASK_ID}/links", "application/json"),
    ("/v1/convert", "application/json"),
    ("/v1/tasks/upload", UPLOAD_TYPE),
    ("/v1/convert", UPLOAD_TYPE),
]


def send_giant(url: str, path: str, content_type: str, *, declared: bool, key: str | None) -> httpx.Response:
    head = UPLOAD_HEAD if content_type == UPLOAD_TYPE else b""
    headers = {"Content-Type": content_type}
    if declared:  # else httpx sends it chunked: no length to refuse up front, the bytes are counted
        headers["Content-Length"] = str(len(head) + GIANT)
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    body = giant(head=head)
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post(path, content=body, headers=headers)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_giant_bodies_without_a_valid_key_are_refused_unread(service, declared):
    with PeakRss(service.pid) as rss:
        for path, content_type in GIANT_TARGETS:
            for key in (None, "sk_wrong"):
                started = time.monotonic()
                refused = send_giant(service.server.url, path, content_type, declared=declared, key=key)
                assert_error(refused, 401, "unauthorized")
                assert refused.headers["www-authenticate"] == "Bearer"
                assert time.monotonic() - started < 10, path  # not after taking in 300 MiB
    assert rss.growth < 40 * MIB, f"the server grew by {rss.growth / MIB:.0f} MiB"
    assert httpx.get(f"{service.server.url}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_giant_bodies_with_a_key_get_413_naming_their_limit(service, declared):
    rejected_before = service.rejected_too_large()
    with PeakRss(service.pid) as rss:
        for path, content_type in GIANT_TARGETS:
            refused = send_giant(service.server.url, path, content_type, declared=declared, key=KEY)
            error = assert_error(refused, 413, "payload_too_large")
            limit = 1 * MIB if content_type == UPLOAD_TYPE else 64 * 1024  # APP_MAX_UPLOAD_MB, JSON's own
            assert str(limit) in error["message"], (path, error)
    assert rss.growth < 40 * MIB, f"the server grew by {rss.growth / MIB:.0f} MiB"
    assert list((service.data_dir / "spool").iterdir()) == []
    assert httpx.get(f"{service.server.url}/healthz", timeout=5).status_code == 200
    # Counted as refused submissions, as before the limit moved in front of the routes (the links
    # route creates no task, so four of the five).
    assert service.rejected_too_large() - rejected_before == 4


async def test_small_refused_bodies_are_read_so_every_client_sees_its_answer(service):
    """A wrong key on a 1 kB upload, or a JSON body a little over its limit: the server drops the
    small rest of the body before answering, so a client still writing gets the answer, never a
    reset connection (httpx's async client saw ReadError in 16 of 40 tries before)."""
    pdf = make_pdf(1)
    over = b'{"url": "' + b"a" * (100 * 1024) + b'"}'  # 100 KiB, over the 64 KiB JSON limit
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=service.server.url, timeout=30) as client:
        for _ in range(20):
            wrong = await client.post(
                "/v1/tasks/upload", files={"file": ("a.pdf", pdf)}, headers={"Authorization": "Bearer sk_no"}
            )
            assert_error(wrong, 401, "unauthorized")
            large = await client.post("/v1/tasks", content=over, headers=headers)
            assert_error(large, 413, "payload_too_large")


# --- limits and nesting, against a service in this process --------------------------------------


def test_json_bodies_have_their_own_small_limit_set_in_kib(make_server):
    server = make_server(max_json_body_kb=1)  # 1024 bytes
    url = '{"url": "http://127.0.0.1:9/a.pdf"}'
    fits = url + " " * (1024 - len(url))
    # Exactly the limit reaches the route, which refuses the address, not the size.
    assert_error(server.client.post("/v1/tasks", content=fits, headers=_json()), 400, "url_not_allowed")
    for declared in (True, False):
        body = fits + " "
        content: Any = body.encode() if declared else iter([body[:600].encode(), body[600:].encode()])
        refused = server.client.post("/v1/tasks", content=content, headers=_json())
        assert "1024 bytes" in assert_error(refused, 413, "payload_too_large")["message"]
    # Uploads keep APP_MAX_UPLOAD_MB: a multipart body far past 1 KiB is taken.
    accepted = upload(server.client, make_pdf(2, picture_page=None))
    assert accepted.status_code == 202, accepted.text


def _json() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def test_deeply_nested_json_is_refused_and_leaves_nothing(make_server):
    server = make_server(answers=[PAGE_1])
    deep = "[" * 30_000 + "]" * 30_000
    task = upload(server.client, make_pdf(1, picture_page=None)).json()["task_id"]
    finished(server.client, task)
    bodies = {
        "/v1/tasks": f'{{"url": "http://127.0.0.1:9/a.pdf", "options": {{"prompt": {deep}}}}}',
        "/v1/convert": f'{{"url": "http://127.0.0.1:9/a.pdf", "options": {deep}}}',
        f"/v1/tasks/{task}/links": f'{{"file": {deep}}}',
    }
    for path, body in bodies.items():
        refused = server.client.post(path, content=body, headers=_json())
        assert f"deeper than {MAX_JSON_DEPTH}" in assert_error(refused, 422, "invalid_request")["message"]
    refused = upload(server.client, make_pdf(1), options=deep)
    assert f"deeper than {MAX_JSON_DEPTH}" in assert_error(refused, 422, "invalid_options")["message"]
    # At the limit the nesting is no reason to refuse: the options themselves are.
    at_limit = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
    refused = upload(server.client, make_pdf(1), options=f'{{"prompt": {at_limit}}}')
    assert "deeper" not in assert_error(refused, 422, "invalid_options")["message"]
    # Brackets inside strings are text, not nesting.
    accepted = upload(
        server.client, make_pdf(1, picture_page=None), options=json.dumps({"prompt": deep[:200]})
    )
    assert accepted.status_code == 202, accepted.text
    finished(server.client, accepted.json()["task_id"])
    assert server.spool_files() == []
    assert server.client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("text", "too_deep"),
    [
        (rb'{"a": [{"b": [1]}]}', False),  # four levels
        (rb'{"a": [{"b": [[1]]}]}', True),
        (rb'["[[[[[", "{{{{{"]', False),  # brackets in strings are text
        (rb'["\\", [[[[1]]]]]', True),  # an escaped backslash ends nothing: the string closes after it
        (rb'["\"[[[[[", 1]', False),  # an escaped quote does not close the string
        (rb"[[[[[", True),  # not JSON, and refused before a parser sees it
    ],
)
def test_nesting_is_counted_outside_strings(text, too_deep):
    assert json_nesting_exceeds(text, max_depth=4) is too_deep
    if not too_deep and text.endswith((b"]", b"}")):
        json.loads(text)  # the cases are JSON as a parser reads it


def test_numbers_are_ascii_digits_or_refused(make_server):
    server = make_server(answers=[PAGE_1])
    task = upload(server.client, make_pdf(1, picture_page=None)).json()["task_id"]
    finished(server.client, task)
    link = server.client.post(f"/v1/tasks/{task}/links", json={"file": "full.md"}).json()["url"]
    with httpx.Client(base_url=server.url) as anonymous:  # share links need no key
        assert anonymous.get(link).status_code == 200
        signature = httpx.URL(link).params["signature"]
        for expires in ("²", "%C2%B2", "%B2", "１２", "1" * 5000, "-1", " 1"):
            refused = anonymous.get(f"/v1/shared/{task}/full.md?expires={expires}&signature={signature}")
            assert_error(refused, 403, "link_invalid")
    huge_options = '{"dpi": ' + "9" * 5000 + "}"  # more digits than int() converts
    assert_error(upload(server.client, make_pdf(1), options=huge_options), 422, "invalid_options")
    assert server.spool_files() == []


# --- a little fuzzing: hostile values in every parameter of every route ---------------------------

HOSTILE = [
    "",
    " ",
    "0",
    "-1",
    "-" + "9" * 30,
    "9" * 30,
    "9" * 5000,
    "1e309",
    "nan",
    "-inf",
    "0x1f",
    "²",
    "١٢٣",
    "１２",
    "🙂",
    "\u202e\u200b",
    "..",
    "../../../etc/passwd",
    "a/b",
    "\\",
    "true",
    "null",
    "[]",
    "{}",
    "[" * 2000,
    "x" * 9000,
]
NUL_AND_BAD_BYTES = ["%00", "a%00b", "%FF%FE", "%C0%AF", "%ED%A0%80"]  # already percent-encoded
# h11 sends no control bytes and no spaces at either end of a header value: none are on the wire.
HOSTILE_HEADER_VALUES = [v.encode() for v in HOSTILE if v.isascii() and v == v.strip()] + [
    b"\xff\xfe",
    b"\xb2",
    b"\xc2\xb2",
    b"\xef\xbc\x91",
    b"Bearer \xff",
    b"Bearer",
    b"Bearer \xb2",
]
HOSTILE_JSON: list[Any] = [
    None,
    True,
    -1,
    0,
    10**30,
    -(10**30),
    1e308,
    "",
    "²",
    "a\u0000b",
    "\ud800",
    "x" * 9000,
    [],
    {},
    [[[[[[]]]]]],
    {"a": {"b": {"c": 1}}},
]


def _issued(server: Any) -> dict[str, str]:
    """Valid values for every path parameter: a finished task, one of its figures, a share link."""
    task = upload(server.client, make_pdf(1, picture_page=None)).json()["task_id"]
    finished(server.client, task)
    link = httpx.URL(server.client.post(f"/v1/tasks/{task}/links", json={"file": "full.md"}).json()["url"])
    return {
        "task_id": task,
        "name": "p0001_01.png",
        "number": "1",
        "page": "1",
        "file": "full.md",
        "expires": link.params["expires"],
        "signature": link.params["signature"],
    }


class Findings:
    """Sends requests and keeps those answered with a server error, outside the one error shape, or
    not at all (a crash can reset the connection instead of answering)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.problems: list[str] = []
        self.sent = 0

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response | None:
        content = kwargs.get("content", b"")
        what = f"{method} {url[:120]} {kwargs.get('headers', '')!s:.80} ...{content[-120:]!r}"
        self.sent += 1
        try:
            response = self.client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            self.problems.append(f"{what}: no answer ({exc!r})")
            return None
        if response.status_code >= 500:
            self.problems.append(f"{what}: {response.status_code} {response.text[:200]}")
        elif response.status_code >= 400 and response.headers.get("content-type") == "application/json":
            error = response.json().get("error")
            if not (isinstance(error, dict) and error.get("code") and error.get("message")):
                self.problems.append(
                    f"{what}: {response.status_code} not in the error shape: {response.text}"
                )
        return response


def _hostile_requests(
    template: str, params: list[dict[str, Any]], valid: dict[str, str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(url, request arguments) with one parameter hostile at a time, the others valid; and every
    hostile ``Authorization``. Query parameters without a valid value are left out."""
    in_path = [p["name"] for p in params if p["in"] == "path"]
    in_query = [p["name"] for p in params if p["in"] == "query" and p["name"] in valid]

    def url(hostile_name: str = "", value: str = "") -> str:
        path = template.format(**{n: value if n == hostile_name else valid[n] for n in in_path})
        query = [f"{n}={value if n == hostile_name else valid[n]}" for n in in_query]
        if hostile_name and hostile_name not in in_path + in_query:
            query.append(f"{hostile_name}={value}")
        return f"{path}?{'&'.join(query)}" if query else path

    encoded = [quote(v, safe="") for v in HOSTILE] + NUL_AND_BAD_BYTES
    for param in params:
        if param["in"] in ("path", "query"):
            for value in encoded:
                yield url(param["name"], value), {}
        elif param["in"] == "header":
            for raw in HOSTILE_HEADER_VALUES:
                yield url(), {"headers": {param["name"]: raw}}
    for raw in HOSTILE_HEADER_VALUES:
        yield url(), {"headers": {"Authorization": raw}}


def test_hostile_values_in_every_parameter_and_header_get_no_500(make_server):
    server = make_server(answers=[PAGE_1])
    valid = _issued(server)
    spec = server.client.get("/openapi.json").json()
    findings = Findings(server.client)
    for template, operations in spec["paths"].items():
        for method, operation in operations.items():
            for url, arguments in _hostile_requests(template, operation.get("parameters", []), valid):
                findings.send(method.upper(), url, **arguments)
    _fuzz_bodies(findings, valid["task_id"])
    assert findings.problems == [], "\n".join(findings.problems[:30])
    assert findings.sent > 1000
    assert server.client.get("/healthz").status_code == 200
    assert server.spool_files() == []


def _fuzz_bodies(findings: Findings, task: str) -> None:
    """Hostile JSON fields, raw bytes that are not JSON or not UTF-8, and hostile multipart parts."""
    url = "http://127.0.0.1:9/a.pdf"  # refused by the address guard: nothing is fetched
    for value in HOSTILE_JSON:
        bodies: list[tuple[str, dict[str, Any]]] = [
            ("/v1/tasks", {"url": value}),
            ("/v1/convert", {"url": value}),
        ]
        bodies += [
            ("/v1/tasks", {"url": url, "options": {field: value}}) for field in TaskOptions.model_fields
        ]
        bodies += [
            (f"/v1/tasks/{task}/links", {"file": value}),
            (f"/v1/tasks/{task}/links", {"expires_in": value}),
        ]
        for path, body in bodies:
            raw = json.dumps(body).encode("utf-8", "surrogatepass")  # "\ud800" as a lone surrogate
            findings.send(
                "POST", f"{path}?wait=0" if path == "/v1/convert" else path, content=raw, headers=_json()
            )
    raw_bodies = (
        b"\xff\xfe",
        b'{"url": "\xff"}',
        b"\x00",
        b'{"url": "a\x00"}',
        b'{"url": 1e999}',
        b"[" * 60_000,
    )
    for raw in raw_bodies:
        for path in ("/v1/tasks", "/v1/convert?wait=0", f"/v1/tasks/{task}/links"):
            for content_type in ("application/json", "text/plain", "application/x-www-form-urlencoded"):
                findings.send("POST", path, content=raw, headers={"Content-Type": content_type})
    pdf = make_pdf(1, picture_page=None)
    filenames = [
        b"a\x00b.pdf",
        b"\xff\xfe.pdf",
        b"../../etc/passwd",
        b"x" * 5000 + b".pdf",
        b"\xe2\x80\xae.pdf",
        b"",
    ]
    for filename in filenames:
        body = _multipart([(b"file", filename, pdf)])
        response = findings.send(
            "POST", "/v1/tasks/upload", content=body, headers={"Content-Type": UPLOAD_TYPE}
        )
        if response is not None and response.status_code == 202:
            finished(findings.client, response.json()["task_id"])
    for field in ["options", *TaskOptions.model_fields]:
        for value in [v.encode() for v in HOSTILE] + [
            b"\xff",
            b"a\x00b",
            json.dumps({"dpi": 10**30}).encode(),
        ]:
            body = _multipart([(b"file", b"a.pdf", b"%PDF-1.4 not really"), (field.encode(), None, value)])
            findings.send("POST", "/v1/tasks/upload", content=body, headers={"Content-Type": UPLOAD_TYPE})


def _multipart(parts: list[tuple[bytes, bytes | None, bytes]]) -> bytes:
    """A multipart/form-data body with boundary ``b``, built by hand so names may hold any byte."""
    out = b""
    for name, filename, value in parts:
        disposition = b'form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out += b"--b\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--b--\r\n"
