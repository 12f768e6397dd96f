"""Share-link downloads, which need no API key, and the dependencies for publishing and downloads.

``router`` carries no auth dependency on purpose: the link's signature is its only credential, and
it grants exactly the one file of the one task it names (``app.storage.links``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse

from app.result_files import ARCHIVE_NAME
from app.schemas import ErrorBody
from app.storage.archive import CHUNK
from app.storage.links import SHARE_PREFIX
from app.tasks.downloads import Downloads
from app.tasks.followups import FollowUps


async def get_downloads(request: Request) -> Downloads:  # async: no thread hop (see app.api.deps)
    return request.app.state.downloads


async def get_followups(request: Request) -> FollowUps:
    return request.app.state.followups


DownloadsDep = Annotated[Downloads, Depends(get_downloads)]
FollowUpsDep = Annotated[FollowUps, Depends(get_followups)]

router = APIRouter(prefix=SHARE_PREFIX, tags=["shared"])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (403, 404, 409)}


def stream_file(handle: BinaryIO) -> Iterator[bytes]:
    """Chunks of ``handle``, closed at the end; a plain iterator, so Starlette reads it in a thread."""
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


@router.get(
    "/{task_id}/{file:path}", responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS}
)
async def read_shared_file(
    # No length limits here: anything not exactly as issued fails the signature check with 403.
    task_id: Annotated[str, Path(description="The task id, as issued.")],
    file: Annotated[str, Path(description='The file, as issued: "full.md", "images/p0003_01.png"...')],
    downloads: DownloadsDep,
    expires: Annotated[str | None, Query(description="Unix seconds, as issued.")] = None,
    signature: Annotated[str | None, Query(description="As issued.")] = None,
) -> StreamingResponse:
    """Download the one result file a share link grants; no API key needed."""
    handle, content_type = await downloads.open_shared(task_id, file, expires, signature)
    headers = {}
    if file == ARCHIVE_NAME:
        headers["Content-Disposition"] = f'attachment; filename="{task_id}.zip"'
    return StreamingResponse(stream_file(handle), media_type=content_type, headers=headers)
