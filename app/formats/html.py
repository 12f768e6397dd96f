"""A result as one self-contained HTML page: figures inlined, LaTeX as MathML, nothing that runs.

Every block's Markdown goes through the console's renderer and sanitiser
(``app.render.markdown_to_html``), which removes scripts, handlers, styles and every image. The
figures are then put back by this module alone, as ``data:`` URIs of the crops' own bytes, so the
page loads nothing from anywhere. A Content-Security-Policy in the page says the same to the browser
(no script, no connection, images only from ``data:``), in case a sanitiser bug ever let something
through.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterator, Mapping
from typing import Any

from app.formats.figures import ImageSource, load_image
from app.formats.segments import Document, Unit, read_document, units
from app.render import markdown_to_html

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#111}"
    "section.page{border-top:1px solid #ccc;padding-top:.5rem;margin-top:2rem}"
    "p.page-number{color:#666;font-size:.8rem;text-align:right;margin:0}"
    "figure{margin:1rem 0;text-align:center}figure img{max-width:100%;height:auto}"
    "figcaption{font-size:.9rem;color:#333}"
    "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #999;padding:.2rem .4rem}"
    "math[display=block]{margin:1rem 0}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
# Nothing but the inline style above and data: images; no script, form, frame, font or connection.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; img-src data:; style-src 'sha256-{_STYLE_HASH}'; "
    "base-uri 'none'; form-action 'none'"
)


def stream_html(
    result: Mapping[str, Any], images: ImageSource, *, title: str | None = None
) -> Iterator[bytes]:
    """The page as UTF-8 pieces, a block or a figure at a time.

    ``title`` defaults to the source's file name in ``result`` (``source.filename``), else the first
    heading. A crop that ``images`` does not have is left out; its caption stays. Memory is bounded
    by the largest crop (base64-encoded) and the largest block. CPU work: run it in a thread.
    """
    document = read_document(result)
    grouped = units(document)
    yield _head(title or _default_title(result, document, grouped)).encode()
    page: int | None = None
    for unit in grouped:
        number = unit.segments[0].page.page
        if number != page:
            if page is not None:
                yield b"</section>\n"
            yield f'<section class="page" aria-label="Page {number}">\n'.encode()
            yield f'<p class="page-number">{number}</p>\n'.encode()
            page = number
        if unit.kind == "figure":
            yield from _figure(document, unit, images)
        else:
            for segment in unit.segments:
                yield (markdown_to_html(document.text(segment)) + "\n").encode()
    if page is not None:
        yield b"</section>\n"
    yield b"</main>\n</body>\n</html>\n"


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n"
    )


def _figure(document: Document, unit: Unit, images: ImageSource) -> Iterator[bytes]:
    caption = "\n\n".join(document.text(segment) for segment in unit.captions)
    alt = html.escape(" ".join(caption.split())[:300] or "Figure", quote=True)
    yield b"<figure>\n"
    for link in unit.links:
        loaded = load_image(images, link.image_name or "")
        if loaded is None:
            continue
        data, media_type = loaded
        yield f'<img alt="{alt}" src="data:{media_type};base64,'.encode()
        yield base64.b64encode(data)
        yield b'">\n'
    if caption:
        yield f"<figcaption>{markdown_to_html(caption)}</figcaption>\n".encode()
    yield b"</figure>\n"


def _default_title(result: Mapping[str, Any], document: Document, grouped: list[Unit]) -> str:
    source = result.get("source")
    if isinstance(source, Mapping) and isinstance(source.get("filename"), str) and source["filename"]:
        return str(source["filename"])
    for unit in grouped:
        if unit.kind == "heading":
            return " ".join(document.text(unit.segments[0]).lstrip("#").split())
    return "Document"
