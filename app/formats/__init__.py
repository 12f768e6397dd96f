"""A task's result in the forms people use it: chunks for retrieval, one HTML page, a Word file.

Pure conversions of a parsed ``result.json`` (and its crops, read through an ``ImageSource``);
nothing here knows HTTP or where results are stored. All of it is CPU work: run it in a thread.
"""

from app.formats.chunks import (
    Chunk,
    ChunkBlock,
    ChunkFigure,
    ChunkSet,
    check_limits,
    iter_chunks,
    stream_chunks_json,
)
from app.formats.docx import write_docx
from app.formats.figures import ImageSource
from app.formats.html import stream_html
from app.formats.tokens import CHARS, TokenCounter, load_counter

__all__ = [
    "CHARS",
    "Chunk",
    "ChunkBlock",
    "ChunkFigure",
    "ChunkSet",
    "ImageSource",
    "TokenCounter",
    "check_limits",
    "iter_chunks",
    "load_counter",
    "stream_chunks_json",
    "stream_html",
    "write_docx",
]
