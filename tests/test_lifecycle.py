"""The task's lifecycle on the record: the legal moves of ``status`` and what each one leaves."""

from __future__ import annotations

import pytest

from app.documents import DocumentKind
from app.errors import TaskAlreadyFinished
from app.records import Progress, SourceInfo, TaskErrorInfo, TaskOptions, TaskRecord, TaskStatus


def _record() -> TaskRecord:
    return TaskRecord(
        source=SourceInfo(filename="a.pdf", content_type="application/pdf", size_bytes=10, pages=3),
        options=TaskOptions(),
        page_numbers=[1, 2, 3],
        input_name="document.pdf",
        input_kind=DocumentKind.PDF,
        progress=Progress(pages_total=3),
    )


def test_a_queued_task_canceled_ends_at_once() -> None:
    record = _record()
    assert record.cancel() is True
    assert record.status is TaskStatus.CANCELED
    assert record.finished_at is not None
    assert record.cancel_requested


def test_a_running_task_canceled_only_records_the_request() -> None:
    record = _record()
    record.start()
    assert record.cancel() is False
    assert record.status is TaskStatus.RUNNING
    assert record.cancel_requested
    record.finish(TaskStatus.CANCELED)
    assert record.status is TaskStatus.CANCELED


def test_an_ended_task_refuses_every_move() -> None:
    record = _record()
    record.start()
    record.finish(TaskStatus.SUCCEEDED)
    with pytest.raises(TaskAlreadyFinished):
        record.cancel()
    with pytest.raises(TaskAlreadyFinished):
        record.finish(TaskStatus.FAILED)
    with pytest.raises(TaskAlreadyFinished):
        record.start()
    with pytest.raises(TaskAlreadyFinished):
        record.requeue("again")
    assert record.status is TaskStatus.SUCCEEDED


def test_requeue_goes_back_from_running_only_and_clears_the_start() -> None:
    record = _record()
    with pytest.raises(RuntimeError, match="no move from queued"):
        record.requeue("never started")
    with pytest.raises(RuntimeError, match="no move from queued"):
        record.finish(TaskStatus.SUCCEEDED)  # a queued task cannot succeed without running
    record.start()
    record.requeue("interrupted by a shutdown")
    assert record.status is TaskStatus.QUEUED
    assert record.started_at is None
    assert record.waiting_reason == "interrupted by a shutdown"
    record.start()
    assert record.lease == 2
    assert record.attempts == 2
    assert record.waiting_reason is None


def test_finish_takes_final_statuses_only_and_records_the_error() -> None:
    record = _record()
    record.start()
    with pytest.raises(ValueError, match="not a final status"):
        record.finish(TaskStatus.QUEUED)
    record.start()  # taken over from a worker that went silent: running again, a new lease
    assert record.lease == 2
    record.finish(TaskStatus.FAILED, TaskErrorInfo(code="x", message="y"))
    assert record.error is not None
    assert record.error.code == "x"
    assert record.waiting_reason is None
