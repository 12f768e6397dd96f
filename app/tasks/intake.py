"""Intake: what a client sends to create a task (a multipart upload, or a URL), turned into a task.

The routers parse the request and hand over what they read (headers, the body as a byte stream, a
validated URL); the intake refuses early when the queue is full, spools the document to the store's
spool directory within ``APP_MAX_UPLOAD_MB``, reads the upload's options from its form fields and
passes the document on to ``TaskService``. Nothing spooled stays behind when the request is refused.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterable, Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.errors import InvalidOptions
from app.json_depth import MAX_JSON_DEPTH, json_nesting_exceeds
from app.pipeline.sources import fetch_url, receive_multipart
from app.records import TaskOptions
from app.tasks.service import Created, TaskService
from app.tenants import Tenant, Tenants


class Intake:
    """Creates tasks from uploads and URLs, within the service's size and URL-fetch limits.

    ``spool`` returns a fresh path in the store's spool directory (``TaskStore.spool_path``) where a
    document is written before a task takes it. ``max_upload_bytes`` bounds an uploaded or fetched
    document, unless the caller's tenant (found in ``tenants`` by the caller's owner id) has a
    ``max_upload_mb`` of its own; ``allow_private``, the timeouts (seconds) and ``max_redirects``
    are those of ``fetch_url``.
    """

    def __init__(
        self,
        tasks: TaskService,
        *,
        spool: Callable[[], Path],
        max_upload_bytes: int,
        allow_private: bool,
        connect_timeout: float,
        read_timeout: float,
        max_redirects: int,
        tenants: Tenants | None = None,
    ) -> None:
        self._tasks = tasks
        self._tenants = tenants
        self._spool = spool
        self._max_bytes = max_upload_bytes
        self._allow_private = allow_private
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_redirects = max_redirects

    async def from_upload(
        self,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterable[bytes],
        *,
        owner: str | None,
        idempotency_key: str | None,
    ) -> Created:
        """Queue the document of a ``multipart/form-data`` body (its ``file`` part), with the options
        of its other fields (``_options_from_form``); with an ``idempotency_key`` seen before, find
        that key's task instead.

        Raises ``QueueFull``, or ``QuotaExceeded`` for a tenant at a limit, before reading the body;
        what ``receive_multipart`` raises (``PayloadTooLarge``, ``UnsupportedMediaType``,
        ``InvalidOptions``, ``InvalidDocument``);
        ``InvalidOptions`` for unusable options; and what ``TaskService.create_from_upload`` raises.
        The spooled file is moved into the new task or deleted, whatever happens.
        """
        tenant = self._tenant(owner)
        await self._tasks.ensure_capacity(tenant)
        form = await receive_multipart(
            content_type, content_length, body, self._spool(), max_bytes=self._max_upload_bytes(tenant)
        )
        try:
            options = _options_from_form(form.fields)
        except BaseException:  # whatever refused the options, the spooled file must not stay behind
            form.file.path.unlink(missing_ok=True)
            raise
        return await self._tasks.create_from_upload(
            form.file, options, owner=owner, idempotency_key=idempotency_key, tenant=tenant
        )

    async def from_url(
        self, url: str, options: TaskOptions, *, owner: str | None, idempotency_key: str | None
    ) -> Created:
        """Queue the document at an http(s) ``url``; with an ``idempotency_key`` seen before, find
        that key's task instead, without downloading anything.

        Raises ``QueueFull``, or ``QuotaExceeded`` for a tenant at a limit, before downloading; what
        ``fetch_url`` raises (``UrlNotAllowed``, ``UrlFetchFailed``, ``PayloadTooLarge``,
        ``UnsupportedMediaType``, ``InvalidDocument``),
        having deleted what it wrote; and what ``TaskService.create_from_url`` raises.
        """
        tenant = self._tenant(owner)
        await self._tasks.ensure_capacity(tenant)
        # Called by the service only once the Idempotency-Key check says a task is to be created.
        fetch = functools.partial(
            fetch_url,
            url,
            self._spool(),
            max_bytes=self._max_upload_bytes(tenant),
            allow_private=self._allow_private,
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            max_redirects=self._max_redirects,
        )
        return await self._tasks.create_from_url(
            url, options, fetch, owner=owner, idempotency_key=idempotency_key, tenant=tenant
        )

    def _tenant(self, owner: str | None) -> Tenant | None:
        """The caller's tenant, by the owner id its key authenticated as; ``None`` with auth off."""
        return self._tenants.by_owner(owner) if self._tenants is not None else None

    def _max_upload_bytes(self, tenant: Tenant | None) -> int:
        own_mb = tenant.limits.max_upload_mb if tenant is not None else None
        return own_mb * 1024 * 1024 if own_mb is not None else self._max_bytes


def _options_from_form(fields: dict[str, str]) -> TaskOptions:
    """An upload's options: the ``options`` field as a JSON object, then the plain fields named as
    options (``pages=1-3``) on top of it; empty plain fields are ignored. ``InvalidOptions`` names
    every problem."""
    merged = _options_json(fields["options"]) if fields.get("options") else {}
    merged.update({k: v for k, v in fields.items() if k in TaskOptions.model_fields and v != ""})
    try:
        return TaskOptions.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidOptions(problems) from exc


def _options_json(text: str) -> dict[str, Any]:
    """The ``options`` form field as a JSON object; ``InvalidOptions`` for anything else."""
    # Checked before parsing: json recurses per level and raises RecursionError on deep input.
    if json_nesting_exceeds(text.encode()):
        raise InvalidOptions(
            f"the 'options' field nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        )
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOptions(f"the 'options' field is not valid JSON: {exc.msg}") from exc
    except ValueError as exc:  # a number with more digits than int() converts (sys.get_int_max_str_digits)
        raise InvalidOptions(f"the 'options' field cannot be read: {exc}") from exc
    if not isinstance(parsed, dict):
        raise InvalidOptions("the 'options' field must be a JSON object")
    return parsed
