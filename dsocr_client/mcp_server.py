"""``dsocr mcp``: a Model Context Protocol server whose tools convert documents with a dsocr server.

Tools: ``convert_document`` (a path or URL in, Markdown out, with progress notifications while it
waits), ``get_layout``, ``get_chunks`` (the document split for retrieval) and ``get_figure``. Every
failure reaches the agent as a tool error whose message says what to do (start the server, set the
key, send a PDF or image), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from dsocr_client._client import AsyncClient
from dsocr_client.errors import (
    AuthError,
    ConnectionFailed,
    DsocrError,
    NotFound,
    UnsupportedFile,
    describe_error,
)
from dsocr_client.models import Progress


def _tool_error(exc: DsocrError, base_url: str) -> ToolError:
    """The client's error as a message an agent (or its user) can act on."""
    if isinstance(exc, ConnectionFailed):
        return ToolError(f"cannot reach the dsocr server at {base_url}: is it running? ({exc.message})")
    if isinstance(exc, AuthError):
        return ToolError(
            f"the dsocr server at {base_url} refused the API key: set DSOCR_API_KEY to a valid key"
        )
    if isinstance(exc, UnsupportedFile):
        return ToolError(
            f"unsupported file: send a PDF or an image (PNG, JPEG, WebP, TIFF, BMP). {exc.message}"
        )
    if isinstance(exc, NotFound):
        return ToolError(f"not found: {exc.message}")
    return ToolError(f"{exc.code}: {exc.message}")


def build_server(base_url: str | None = None, api_key: str | None = None) -> MCPServer:
    """The MCP server, its tools talking to the dsocr server at ``base_url`` with ``api_key``
    (defaults: ``DSOCR_URL``, ``DSOCR_API_KEY``). Each tool call opens its own client, so nothing
    outlives a call when the agent goes away."""
    server = MCPServer(
        "dsocr",
        instructions="OCR for PDFs and images: convert_document returns Markdown; figures it links as "
        "images/<name> are fetched with get_figure, block boxes with get_layout, and chunks for a "
        "retrieval index (text, headings, pages, boxes) with get_chunks.",
    )

    def client() -> AsyncClient:
        return AsyncClient(base_url, api_key)

    @server.tool()
    async def convert_document(
        path_or_url: str, ctx: Context, pages: str | None = None, mode: str | None = None
    ) -> str:
        """Convert a PDF or image (a local path, or an http(s) URL the server fetches) to Markdown.

        pages: 1-based selection such as "1-3,7" (default: all). mode: "document" (Markdown with
        layout, the default), "free", "figure" or "describe". The first line names the task id,
        for get_layout and get_figure.
        """
        source: str | Path = path_or_url
        if not path_or_url.startswith(("http://", "https://")):
            local = await anyio.Path(path_or_url).expanduser()
            if not await local.is_file():
                raise ToolError(f"no such file: {path_or_url}")
            source = Path(local)

        async def progress(update: Progress) -> None:
            message = f"{update.status}: {update.pages_done}/{update.pages_total} pages"
            await ctx.report_progress(update.pages_done, update.pages_total or None, message)

        async with client() as dsocr:
            try:
                task = await dsocr.submit(source, pages=pages, mode=mode)
                task = await dsocr.wait(task.task_id, on_progress=progress)
                if task.status != "succeeded":
                    reason = f"{task.error.code}: {task.error.message}" if task.error else task.status
                    raise ToolError(f"the conversion {task.status}: {reason}")
                markdown = (await dsocr.result(task.task_id, "full.md")).decode()
            except ToolError:
                raise
            except DsocrError as exc:
                raise _tool_error(exc, dsocr.base_url) from exc
            except Exception as exc:  # the SDK would answer a bare "Error executing tool": say what
                raise ToolError(f"the conversion could not be completed: {describe_error(exc)}") from exc
        return f"<!-- dsocr task_id: {task.task_id} -->\n{markdown}"

    @server.tool()
    async def get_layout(task_id: str) -> dict[str, Any]:
        """The layout of a converted document: per page, every block's type, pixel box and 0-999 box."""
        async with client() as dsocr:
            try:
                layout: dict[str, Any] = json.loads(await dsocr.result(task_id, "layout.json"))
            except DsocrError as exc:
                raise _tool_error(exc, dsocr.base_url) from exc
        return layout

    @server.tool()
    async def get_chunks(
        task_id: str, max_tokens: int = 512, overlap: int = 0, tokenizer: str = "chars"
    ) -> dict[str, Any]:
        """A converted document split along its structure for retrieval: each chunk's Markdown text,
        the headings above it, its pages, the boxes of the blocks it came from (pixels, 0-999 and
        PDF points) and its token count. Tables, equations and figures stay whole; text is split past
        max_tokens. tokenizer: "chars" (an estimate) or a Hugging Face tokenizer the server has."""
        async with client() as dsocr:
            try:
                chunks = await dsocr.chunks(
                    task_id, max_tokens=max_tokens, overlap=overlap, tokenizer=tokenizer
                )
            except DsocrError as exc:
                raise _tool_error(exc, dsocr.base_url) from exc
        return chunks

    @server.tool()
    async def get_figure(task_id: str, name: str) -> Image:
        """One cropped figure of a converted document, by the name its Markdown links (images/<name>)."""
        async with client() as dsocr:
            try:
                data = await dsocr.result(task_id, f"images/{name.removeprefix('images/')}")
            except DsocrError as exc:
                raise _tool_error(exc, dsocr.base_url) from exc
        return Image(data=data, format="png")

    return server


def serve_mcp(
    base_url: str | None,
    api_key: str | None,
    *,
    http: bool = False,
    host: str = "127.0.0.1",
    port: int = 8765,
) -> None:
    """Run the MCP server on stdio, or on streamable HTTP at ``http://host:port/mcp``; blocks."""
    server = build_server(base_url, api_key)
    if http:
        server.run("streamable-http", host=host, port=port)
    else:
        server.run("stdio")
