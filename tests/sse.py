"""Reading Server-Sent Events in tests: the wire format parsed by hand, so the tests check it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Event:
    id: int
    event: str
    data: dict[str, Any]


def read_events(response: httpx.Response, comments: list[str] | None = None) -> Iterator[Event]:
    """The events of an open ``text/event-stream`` response until it ends; comment lines (keep-alives)
    go to ``comments`` when given."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields:
                yield Event(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                fields = {}
        elif line.startswith(":"):
            if comments is not None:
                comments.append(line)
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def events_path(task_id: str) -> str:
    return f"/v1/tasks/{task_id}/events"
