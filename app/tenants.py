"""Tenants: who may call the API, as whom, and within which limits.

A tenant is a team: a name, the keys it calls with (stored as SHA-256 hashes, never the keys), a
role, a weight (its share of the workers under contention), an optional webhook secret of its own
and optional limits. They come from two places, and both apply when both are set:

- ``APP_TENANTS_FILE``, a YAML file (README "Tenants")::

      tenants:
        - name: acme
          keys: ["sha256:<hex of the key's SHA-256>"]
          role: user            # or admin; default user
          weight: 1             # default 1
          webhook_secret: ...   # optional
          limits: {queued_tasks: 20, running_tasks: 2, pages_per_day: 100000,
                   max_upload_mb: 200, max_pages: 500, event_streams: 20}  # each optional

  reloaded when it changes (``Tenants.reload_if_changed``, polled by ``Tenants.watch``); a file
  that turns invalid keeps the last good one serving and is reported by ``Tenants.error``.
- ``APP_API_KEYS``, the simple form: each key is a tenant ``key-<8 hex>`` with role ``user``,
  weight 1 and the global limits, whose owner id is ``owner_of(key)`` as before tenants existed,
  so the tasks its key created stay visible to it.

Every read (``by_key``, ``get``, ``weight``, ``names``) looks at one immutable snapshot that a
reload replaces with a single assignment, so readers in threads and on the event loop never see a
half-loaded file and need no lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StringConstraints, ValidationError

from app.config import Settings

log = logging.getLogger(__name__)

Role = Literal["user", "admin"]

# Separates owner ids from any other hash of a key; fixed, so ids stay valid across restarts.
_KEY_OWNER_LABEL = b"dsocr-server/task-owner/v1"
# A different label for file tenants, so no tenant name can produce a key's owner id or the reverse.
_TENANT_OWNER_LABEL = b"dsocr-server/tenant-owner/v1"
# Names of the tenants APP_API_KEYS makes; a file tenant may not take one (see _FileTenant).
_KEY_TENANT_PREFIX = "key-"
# A tenants file is a short list of teams: a larger one is a mistake, not something to parse.
MAX_FILE_BYTES = 1024 * 1024
_KEY_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")


class TenantsFileError(ValueError):
    """Raised when ``APP_TENANTS_FILE`` cannot be read or is invalid; the message says where and why
    and never includes a key or a secret."""


@dataclass(frozen=True)
class Limits:
    """A tenant's own limits. ``None``: the global setting applies (``APP_MAX_UPLOAD_MB``,
    ``APP_MAX_PAGES``, ``APP_MAX_STREAMS_PER_KEY``), or no per-tenant limit where there is no global
    one (``queued_tasks``: the global ``APP_QUEUE_MAX`` still bounds the whole queue;
    ``running_tasks``: ``APP_MAX_WORKERS`` bounds all; ``pages_per_day``: unlimited)."""

    queued_tasks: int | None = None  # tasks waiting (not running) at once
    running_tasks: int | None = None  # tasks running at once
    pages_per_day: int | None = None  # pages submitted per UTC day
    max_upload_mb: int | None = None  # MiB per upload or URL download
    max_pages: int | None = None  # pages per task, after the ``pages`` selection
    event_streams: int | None = None  # event streams and long-polls held open at once


@dataclass(frozen=True)
class Tenant:
    """One team. ``owner`` is the owner id stored on its tasks (``records.owner``): every key of a
    tenant sees (and only it sees) the tasks of that owner."""

    name: str
    owner: str
    role: Role
    weight: int  # >= 1: its share of the workers when tenants contend for them
    webhook_secret: SecretStr | None
    limits: Limits


def owner_of(key: str) -> str:
    """The owner id stored on the tasks an ``APP_API_KEYS`` key creates: an HMAC of the key, never
    the key itself (the id every such task has carried since before tenants existed)."""
    return hmac.new(_KEY_OWNER_LABEL, key.encode(), hashlib.sha256).hexdigest()


def tenant_owner(name: str) -> str:
    """The owner id of the file tenant ``name``: derived from the name alone, so it is the same
    across restarts, reloads and key rotations."""
    return hmac.new(_TENANT_OWNER_LABEL, name.encode(), hashlib.sha256).hexdigest()


def hash_key(key: str) -> str:
    """The form a key takes in a tenants file: ``sha256:<hex>`` (``printf %s KEY | sha256sum``)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


# --- the file's schema: validated whole, so one bad entry refuses the file, naming the entry ----


_PositiveLimit = Annotated[int | None, Field(gt=0)]


class _FileLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    queued_tasks: _PositiveLimit = None
    running_tasks: _PositiveLimit = None
    pages_per_day: _PositiveLimit = None
    max_upload_mb: _PositiveLimit = None
    max_pages: _PositiveLimit = None
    event_streams: _PositiveLimit = None


_Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
_KeyHash = Annotated[str, StringConstraints(pattern=_KEY_HASH.pattern)]


class _FileTenant(BaseModel):
    # extra="forbid": a misspelt ``limts:`` must refuse the file, not silently drop every limit.
    model_config = ConfigDict(extra="forbid", strict=True)

    name: _Name
    keys: list[_KeyHash] = Field(min_length=1)
    role: Role = "user"
    weight: int = Field(default=1, ge=1, le=1000)
    webhook_secret: SecretStr | None = Field(default=None, min_length=1)
    limits: _FileLimits = Field(default_factory=lambda: _FileLimits())


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenants: list[_FileTenant]


# --- the registry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    """One consistent view: every tenant by name, and by the SHA-256 digest of each of its keys."""

    by_name: Mapping[str, Tenant]
    by_digest: Mapping[bytes, Tenant]
    by_owner: Mapping[str, Tenant]
    names: tuple[str, ...]


@dataclass(frozen=True)
class _FileState:
    """What the last look at the file found: its content hash (to skip unchanged content) and the
    error that content had (``None``: it is the one serving)."""

    content_hash: bytes | None = None
    error: str | None = None


@dataclass
class Tenants:
    """The registry of tenants. Reads are safe from any thread or task; ``reload_if_changed``
    (blocking: run it in a thread) and ``watch`` (its loop) replace the snapshot.

    ``enabled`` is true when any key is configured (a tenants file, even one listing no tenant yet,
    or ``APP_API_KEYS``): then every API call needs a key, and ``by_key`` says whose it is.
    """

    file: Path | None
    api_keys: tuple[str, ...]
    poll_seconds: float = 2.0
    enabled: bool = field(init=False)
    _key_tenants: tuple[Tenant, ...] = field(init=False, repr=False)
    _key_digests: tuple[bytes, ...] = field(init=False, repr=False)
    _snapshot: _Snapshot = field(init=False, repr=False)
    _state: _FileState = field(init=False, repr=False, default_factory=_FileState)

    def __post_init__(self) -> None:
        self.enabled = self.file is not None or bool(self.api_keys)
        unique = tuple(dict.fromkeys(self.api_keys))
        self._key_digests = tuple(hashlib.sha256(key.encode()).digest() for key in unique)
        self._key_tenants = tuple(
            Tenant(
                name=_KEY_TENANT_PREFIX + owner_of(key)[:8],
                owner=owner_of(key),
                role="user",
                weight=1,
                webhook_secret=None,
                limits=Limits(),
            )
            for key in unique
        )
        self._snapshot = self._combine(())
        if self.file is not None:
            # At start-up a bad file is fatal: there is no last good one to serve instead.
            content = self._read()
            self._apply(content, hashlib.sha256(content).digest(), initial=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Tenants:
        """The registry ``settings`` describe; raises ``TenantsFileError`` for a bad file."""
        return cls(
            file=settings.tenants_file,
            api_keys=tuple(settings.api_keys),
            poll_seconds=settings.tenants_poll_seconds,
        )

    # --- reads ---------------------------------------------------------------------------------

    def by_key(self, key: str) -> Tenant | None:
        """The tenant ``key`` belongs to, or ``None`` for an unknown key.

        The lookup is by the key's SHA-256 digest, so how long it takes depends on the digest, which
        tells an attacker nothing about any stored key (finding a key from its hash is preimage work).
        """
        return self._snapshot.by_digest.get(hashlib.sha256(key.encode()).digest())

    def get(self, name: str) -> Tenant | None:
        """The tenant named ``name``, or ``None``."""
        return self._snapshot.by_name.get(name)

    def by_owner(self, owner: str | None) -> Tenant | None:
        """The tenant whose tasks carry the owner id ``owner`` (what ``CallerDep`` gives), or
        ``None`` (auth off, or a tenant no longer listed)."""
        return self._snapshot.by_owner.get(owner) if owner is not None else None

    def weight(self, name: str | None) -> int:
        """The weight of the tenant ``name``; 1 for ``None`` (auth off) or a name no longer listed."""
        tenant = self._snapshot.by_name.get(name) if name is not None else None
        return tenant.weight if tenant is not None else 1

    def names(self) -> tuple[str, ...]:
        """Every tenant's name, sorted: the bounded label set for metrics."""
        return self._snapshot.names

    @property
    def error(self) -> str | None:
        """Why the file's current content is not serving (the last good one is), or ``None``."""
        return self._state.error

    # --- reloads -------------------------------------------------------------------------------

    def reload_if_changed(self) -> bool:
        """Read the file again and, if its content changed and is valid, serve it. Blocking (file
        I/O): call it from a thread. Returns whether the tenants changed. A missing, unreadable or
        invalid file keeps the last good tenants, logs why and sets ``error`` until it is fixed."""
        if self.file is None:
            return False
        try:
            content = self._read()
        except TenantsFileError as exc:
            self._refuse(None, str(exc))
            return False
        digest = hashlib.sha256(content).digest()
        if digest == self._state.content_hash:
            return False  # unchanged (or the same broken content, already reported)
        return self._apply(content, digest, initial=False)

    async def watch(self) -> None:
        """Reload the file every ``poll_seconds`` until cancelled (a task of the app's lifespan)."""
        if self.file is None:
            return
        while True:
            await asyncio.sleep(self.poll_seconds)
            await asyncio.to_thread(self.reload_if_changed)

    # --- internals -----------------------------------------------------------------------------

    def _read(self) -> bytes:
        assert self.file is not None
        try:
            with self.file.open("rb") as handle:
                content = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise TenantsFileError(f"APP_TENANTS_FILE {self.file}: cannot read it ({exc.strerror})") from exc
        if len(content) > MAX_FILE_BYTES:
            raise TenantsFileError(f"APP_TENANTS_FILE {self.file}: larger than {MAX_FILE_BYTES} bytes")
        return content

    def _apply(self, content: bytes, digest: bytes, *, initial: bool) -> bool:
        try:
            tenants = self._parse(content)
            snapshot = self._combine(tenants)
        except TenantsFileError as exc:
            if initial:
                raise
            self._refuse(digest, str(exc))
            return False
        self._snapshot = snapshot
        self._state = _FileState(content_hash=digest, error=None)
        if not initial:
            log.info("APP_TENANTS_FILE %s reloaded: %d tenants", self.file, len(tenants))
        return True

    def _refuse(self, digest: bytes | None, reason: str) -> None:
        """Keep serving the last good tenants; report ``reason`` once per distinct bad content."""
        if reason != self._state.error:
            log.error("%s; the last good tenants file keeps serving until it is fixed", reason)
        self._state = _FileState(content_hash=digest, error=reason)

    def _parse(self, content: bytes) -> tuple[_FileTenantEntry, ...]:
        where = f"APP_TENANTS_FILE {self.file}"
        try:
            data = yaml.safe_load(content)
        except yaml.YAMLError as exc:
            # The mark says where; the problem text quotes no more than the YAML token it stopped at.
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise TenantsFileError(f"{where}: not valid YAML{at}") from None
        try:
            parsed = _File.model_validate(data)
        except ValidationError as exc:
            raise TenantsFileError(f"{where}: {_describe(exc, data)}") from None
        entries: list[_FileTenantEntry] = []
        seen_names: set[str] = set()
        seen_digests: set[bytes] = set(self._key_digests)
        for entry in parsed.tenants:
            if entry.name in seen_names:
                raise TenantsFileError(f"{where}: tenant {entry.name!r} is listed twice")
            if entry.name.startswith(_KEY_TENANT_PREFIX):
                raise TenantsFileError(
                    f"{where}: tenant {entry.name!r}: names starting with {_KEY_TENANT_PREFIX!r} are "
                    "reserved for the tenants APP_API_KEYS makes"
                )
            seen_names.add(entry.name)
            digests = [bytes.fromhex(key.split(":", 1)[1]) for key in entry.keys]
            for digest in digests:
                # One key, two tenants: whose tasks it sees would depend on lookup order.
                if digest in seen_digests:
                    raise TenantsFileError(
                        f"{where}: tenant {entry.name!r}: a key is also listed for another tenant "
                        "(in this file or in APP_API_KEYS)"
                    )
                seen_digests.add(digest)
            entries.append(_FileTenantEntry(_tenant_of(entry), tuple(digests)))
        return tuple(entries)

    def _combine(self, file_entries: Iterable[_FileTenantEntry]) -> _Snapshot:
        by_name: dict[str, Tenant] = {}
        by_digest: dict[bytes, Tenant] = {}
        for tenant, digest in zip(self._key_tenants, self._key_digests, strict=True):
            by_name[tenant.name] = tenant
            by_digest[digest] = tenant
        for entry in file_entries:
            by_name[entry.tenant.name] = entry.tenant
            for digest in entry.digests:
                by_digest[digest] = entry.tenant
        return _Snapshot(
            by_name=by_name,
            by_digest=by_digest,
            by_owner={tenant.owner: tenant for tenant in by_name.values()},
            names=tuple(sorted(by_name)),
        )


@dataclass(frozen=True)
class _FileTenantEntry:
    tenant: Tenant
    digests: tuple[bytes, ...]


def _tenant_of(entry: _FileTenant) -> Tenant:
    limits = entry.limits
    return Tenant(
        name=entry.name,
        owner=tenant_owner(entry.name),
        role=entry.role,
        weight=entry.weight,
        webhook_secret=entry.webhook_secret,
        limits=Limits(
            queued_tasks=limits.queued_tasks,
            running_tasks=limits.running_tasks,
            pages_per_day=limits.pages_per_day,
            max_upload_mb=limits.max_upload_mb,
            max_pages=limits.max_pages,
            event_streams=limits.event_streams,
        ),
    )


def _describe(exc: ValidationError, data: object) -> str:
    """Each problem with its place, the tenant named where there is one; never the input values
    (they may be webhook secrets)."""
    problems = []
    for error in exc.errors(include_input=False):
        location = list(error["loc"])
        where = ".".join(str(part) for part in location) or "the file"
        if len(location) >= 2 and location[0] == "tenants" and isinstance(location[1], int):
            name = _entry_name(data, location[1])
            if name is not None:
                where = f"tenant {name!r}: " + ".".join(str(part) for part in location[2:])
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def _entry_name(data: object, index: int) -> str | None:
    if isinstance(data, dict):
        entries = data.get("tenants")
        if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
            name = entries[index].get("name")
            return name if isinstance(name, str) else None
    return None
