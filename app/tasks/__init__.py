"""The job system: tasks accepted, queued, run by workers, followed, cancelled and expired.

- ``service.TaskService``: the routers' facade (submit, read, list, follow, cancel, recover, expire)
- ``ledger.TaskLedger``: every change followers hear of (save, then publish), given to the service
  and the workers; status changes themselves are the record's lifecycle methods (``app.records``)
- ``worker.WorkerPool``: takes tasks from the queue, waits on the GPU gate, runs the page pipeline
- ``readiness.Readiness``: what ``/readyz`` reports
- ``intake.Intake``: uploads and URL downloads into tasks; ``downloads.Downloads``: results, the
  zip and share links; ``followups.FollowUps``: publish and webhooks after a task ends
- ``queue`` / ``redis_queue``, ``events`` / ``redis_events``: in one process, or shared on Redis
- ``idempotency``, ``estimates``, ``options``: retry-safe creates, queue estimates, engine options
"""

# Modules, not names: importing one module of the job system does not import all of it.
__all__ = [
    "downloads",
    "estimates",
    "events",
    "followups",
    "idempotency",
    "intake",
    "ledger",
    "options",
    "queue",
    "readiness",
    "redis_events",
    "redis_queue",
    "service",
    "worker",
]
