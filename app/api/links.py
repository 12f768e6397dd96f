"""Share-link downloads, which need no API key.

``router`` carries no auth dependency on purpose: the link's signature is its only credential, and
it grants exactly the one file of the one task it names (``app.storage.links``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from app.api.results import DownloadsDep, file_headers, stream_file
from app.result_files import ROUTE_NAMES
from app.schemas import ErrorBody
from app.storage.links import SHARE_PREFIX

router = APIRouter(prefix=SHARE_PREFIX, tags=["shared"])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (403, 404, 409)}


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
    headers = file_headers(task_id, ROUTE_NAMES.get(file, file))
    return StreamingResponse(stream_file(handle), media_type=content_type, headers=headers)
