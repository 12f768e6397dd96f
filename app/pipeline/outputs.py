"""A run's assembled pages, spooled to a temporary file as each is stored; the result files streamed
from them.

``full.md``, ``layout.json`` and ``result.json`` need of each page its Markdown, its layout entry
and a few flags. Held in memory until the task ended, pages (and their figure crops) grew the
service by about 0.85 MiB each. Here each page becomes one JSON line in an anonymous temporary file
(gone when it is closed, or when the process ends) as soon as it is stored, and each result file is
produced chunk by chunk, byte for byte what ``json.dumps`` of the whole gives (and, for ``full.md``,
``app.pipeline.assemble.merge_markdown``).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

from app.pipeline.assemble import AssembledPage


@dataclass(frozen=True)
class StoredPage:
    """What the result files need of one page (``AssembledPage`` without its crops)."""

    index: int
    number: int
    markdown: str
    truncated: bool
    truncated_reason: str | None
    layout: dict[str, Any]
    quality: dict[str, Any] | None = None  # PageQuality.as_json of the kept attempt

    @classmethod
    def of(cls, page: AssembledPage) -> StoredPage:
        """What is kept of ``page`` once it is stored."""
        return cls(
            page.index,
            page.number,
            page.markdown,
            page.truncated,
            page.truncated_reason,
            page.layout,
            page.quality,
        )

    def result_entry(self) -> dict[str, Any]:
        """The page's entry in ``result.json``'s ``pages``: with ``quality`` (``{"text_layer_agreement",
        "suspect", "reasons", "attempts", "rung"}``) for every page the pipeline judged."""
        entry = {
            "index": self.index,
            "page": self.number,
            "markdown": self.markdown,
            "truncated": self.truncated,
            "truncated_reason": self.truncated_reason,
            **{key: self.layout[key] for key in ("width", "height", "dpi")},
            "blocks": self.layout["blocks"],
        }
        if self.quality is not None:
            entry["quality"] = self.quality
        return entry


class AssembledPages:
    """The pages of one run in the order they were added (page order), on disk; blocking.

    ``add`` each page, then read them back (iterate, or the ``*_chunks`` of a result file) once
    every page is in. ``images`` lists the figure crops' names, in order. ``close`` (or ``with``,
    or dropping the object) drops the file.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close(), the object's life
        self._count = 0
        self.images: list[str] = []

    def __len__(self) -> int:
        return self._count

    def add(self, page: AssembledPage) -> None:
        stored = StoredPage.of(page)
        # One line a page: json.dumps escapes every line break inside strings.
        self._file.write(json.dumps(asdict(stored), ensure_ascii=False).encode() + b"\n")
        self._count += 1
        self.images.extend(name for name, _ in page.crops)

    def __iter__(self) -> Iterator[StoredPage]:
        self._file.flush()
        self._file.seek(0)
        try:
            for line in self._file:
                yield StoredPage(**json.loads(line))
        finally:
            self._file.seek(0, 2)  # later adds append

    def markdown_chunks(self) -> Iterator[bytes]:
        """``full.md``: every page's Markdown, stripped, joined by a blank line, pages without any
        skipped, ending with exactly one newline."""
        first = True
        for page in self:
            text = page.markdown.strip()
            if text:
                yield (text if first else "\n\n" + text).encode()
                first = False
        yield b"\n"

    def layout_chunks(self) -> Iterator[bytes]:
        """``layout.json``: ``{"version": 1, "pages": [<each page's layout>]}``."""
        yield b'{"version": 1, "pages": ['
        for n, page in enumerate(self):
            yield (", " if n else "").encode() + json.dumps(page.layout, ensure_ascii=False).encode()
        yield b"]}"

    def result_chunks(self, view: dict[str, Any]) -> Iterator[bytes]:
        """``result.json``: ``view`` with ``pages`` (where ``view`` has it, else last) set to
        every page's ``StoredPage.result_entry``."""
        marker = json.dumps(uuid.uuid4().hex)
        head, tail = json.dumps({**view, "pages": json.loads(marker)}, ensure_ascii=False).split(marker)
        yield (head + "[").encode()
        for n, page in enumerate(self):
            yield (", " if n else "").encode() + json.dumps(page.result_entry(), ensure_ascii=False).encode()
        yield ("]" + tail).encode()

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        # The file is anonymous: dropping this object unclosed loses nothing, so it closes quietly.
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
