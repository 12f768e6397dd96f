"""Task events on the wire: Server-Sent Events framed by sse-starlette, encoded once per event.

A task's event goes to every stream that follows the task, so the work per event and stream is
what 200 open streams multiply; ``event_stream`` keeps it to one shared encoding and the socket
write itself.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from app.tasks.events import TaskEvent


def event_stream(events: AsyncGenerator[TaskEvent, None], *, ping_seconds: float) -> EventSourceResponse:
    """A ``text/event-stream`` response of ``events``, with a keep-alive comment every
    ``ping_seconds``; ``events`` is closed when the stream ends or the client hangs up."""
    return _EventStream(_encode_all(events), ping=ping_seconds)


class _EventStream(EventSourceResponse):
    """sse-starlette's response, without a cancel scope around each send when there is no timeout.

    ``anyio.move_on_after(None)`` can never fire, yet entering and leaving it costs about as much
    Python time as the rest of a send; across 200 streams that was ~10 ms of event-loop time per
    page, and the worker waited behind it. Without a timeout the behaviour is the same.
    (``_send_with_timeout`` is sse-starlette's own; requirements.txt pins the version it has.)
    """

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


async def _encode_all(events: AsyncGenerator[TaskEvent, None]) -> AsyncIterator[bytes]:
    # Closed with the stream (a client hanging up cancels it), so the hub forgets the follower.
    async with contextlib.aclosing(events):
        async for event in events:
            yield _encoded(event)


@functools.lru_cache(maxsize=1024)
def _encoded(event: TaskEvent) -> bytes:
    """An event in SSE framing (``id:``, ``event:``, ``data:``), encoded once however many streams
    send it: they share the bytes."""
    return ServerSentEvent(data=event.data, event=event.kind.value, id=str(event.id)).encode()
