"""``dsocr mcp`` driven by the MCP SDK's own client over stdio, against a real server."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, ImageContent, TextContent

from tests.documents import make_pdf
from tests.proxy import LONGER_THAN_KEEP_ALIVE, EventStreamProxy, a_page_done
from tests.test_api_e2e import PAGE_1, PAGE_2, PAGE_3


def text(result: CallToolResult) -> str:
    """The tool result's text, the only content these tools return besides a figure."""
    content = result.content[0]
    assert isinstance(content, TextContent)
    return content.text


def params(url: str, key: str = "sk_test") -> StdioServerParameters:
    env = {**os.environ, "DSOCR_URL": url, "DSOCR_API_KEY": key}
    return StdioServerParameters(command=sys.executable, args=["-m", "dsocr_client.cli", "mcp"], env=env)


async def test_convert_document_returns_markdown_with_progress_then_layout_and_figure(make_server, tmp_path):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], ds_batch_size=1)
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(make_pdf(3))
    reports: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total))

    async with stdio_client(params(server.url)) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert tools == {"convert_document", "get_layout", "get_chunks", "get_figure"}

        result = await session.call_tool(
            "convert_document", {"path_or_url": str(pdf)}, progress_callback=on_progress
        )
        assert not result.is_error
        markdown = text(result)
        assert "# Page 1 heading" in markdown
        assert "images/p0003_01.png" in markdown
        assert (3, 3) in reports
        task_id = markdown.split("task_id: ", 1)[1].split(" ", 1)[0]

        layout = await session.call_tool("get_layout", {"task_id": task_id})
        assert len(json.loads(text(layout))["pages"]) == 3
        chunked = await session.call_tool("get_chunks", {"task_id": task_id, "max_tokens": 64})
        assert not chunked.is_error
        chunks = json.loads(text(chunked))["chunks"]
        assert "\n\n".join(chunk["text"] for chunk in chunks) + "\n" == markdown.split("\n", 1)[1]
        assert sorted({page for chunk in chunks for page in chunk["pages"]}) == [1, 2, 3]
        assert [figure["name"] for chunk in chunks for figure in chunk["figures"]] == ["p0003_01.png"]
        refused = await session.call_tool("get_chunks", {"task_id": task_id, "tokenizer": "org/missing"})
        assert refused.is_error
        assert "not in this server's Hugging Face cache" in text(refused)
        figure = await session.call_tool("get_figure", {"task_id": task_id, "name": "p0003_01.png"})
        image = figure.content[0]
        assert isinstance(image, ImageContent)
        assert image.mime_type == "image/png"
        assert base64.b64decode(image.data).startswith(b"\x89PNG")

        missing = await session.call_tool("convert_document", {"path_or_url": str(tmp_path / "nope.pdf")})
        assert missing.is_error
        assert "no such file" in text(missing)
        notes = tmp_path / "notes.txt"
        notes.write_text("not a document")
        unsupported = await session.call_tool("convert_document", {"path_or_url": str(notes)})
        assert unsupported.is_error
        assert "unsupported file" in text(unsupported)


async def test_convert_document_outlasts_keep_alives_and_a_dropped_stream(make_server, tmp_path):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], **LONGER_THAN_KEEP_ALIVE)
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(make_pdf(3))
    reports: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, total))

    with EventStreamProxy(server.url) as proxy:
        async with stdio_client(params(proxy.url)) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            dropping = proxy.drop_streams_when(a_page_done(server.client))
            result = await session.call_tool(
                "convert_document", {"path_or_url": str(pdf)}, progress_callback=on_progress
            )
            dropping.join()
    assert not result.is_error, text(result)
    assert "images/p0003_01.png" in text(result)
    assert [done for done, _ in reports if done] == [1, 2, 3, 3]  # each page once, then the end
    assert proxy.pings >= 5
    assert proxy.dropped == 1
    assert [r for r in proxy.events_requests() if r.headers.get("last-event-id")]


async def test_clear_errors_for_a_wrong_key_and_an_unreachable_server(make_server, tmp_path: Path):
    server = make_server()
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(make_pdf(1, picture_page=None))
    for url, key, expected in (
        (server.url, "sk_wrong", "refused the API key"),
        ("http://127.0.0.1:9", "k", "cannot reach"),
    ):
        async with stdio_client(params(url, key)) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("convert_document", {"path_or_url": str(pdf)})
            assert result.is_error
            assert expected in text(result)
