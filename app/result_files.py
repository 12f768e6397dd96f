"""The names of the files a succeeded task offers, and their media types: words the routes, the
store, the zip and share links all use."""

from __future__ import annotations

import re

RESULT_FILES = {  # stored when the task ends
    "full.md": "text/markdown; charset=utf-8",
    "layout.json": "application/json",
    "result.json": "application/json",
}
IMAGE_NAME = re.compile(r"^p\d{4}_\d{2}\.png$")  # a cropped figure under images/
IMAGE_TYPE = "image/png"
# Built from result.json (and the crops) each time they are read, never stored: chunks.json with
# the defaults (the route takes other limits and tokenizers), one HTML page, a Word file.
EXPORT_FILES = {
    "chunks.json": "application/json",
    "result.html": "text/html; charset=utf-8",
    "result.docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
ARCHIVE_NAME = "result.zip"  # all of the above in one zip, built while it is read
ARCHIVE_TYPE = "application/zip"
PREVIEW_CONTENT_TYPE = "image/webp"  # a page as rendered, for the console
# Names the HTTP routes give a stored file: GET /v1/tasks/{id}/result.md serves full.md, so a share
# link, publish or download asked for by the route's name means the same file.
ROUTE_NAMES = {"result.md": "full.md"}
