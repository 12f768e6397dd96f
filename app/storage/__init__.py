"""Where tasks live: the only code that builds paths or keys. Imports only the ground floor.

- ``base.TaskStore``: the store contract; ``local``: task directories on disk
- ``shared``: the scale-out store (records in Redis via ``redis_records`` and ``redis_conn``, files
  in a bucket via ``s3``, the one place bucket errors become ours)
- ``archive``: the streamed zip; ``publish``: uploads of results; ``webhooks``: signed deliveries;
  ``links``: signed share links
"""

# Modules, not names: the local store must not import boto3 and redis.
__all__ = [
    "archive",
    "base",
    "links",
    "local",
    "publish",
    "redis_conn",
    "redis_records",
    "s3",
    "shared",
    "webhooks",
]
