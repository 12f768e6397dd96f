"""The quota book of ``app.tasks.quotas`` in Redis, shared by every API replica (scale-out).

Keys (``dsocr:`` first): ``quota:queued:<tenant>``, a sorted set of the tenant's admitted task ids
scored by the time until which each counts as queued without a record; ``quota:pages:<tenant>:<day>``,
the pages it submitted on that UTC day, expiring after ``PAGES_TTL_SECONDS``. The statuses come from
``app.storage.redis_records``'s summaries, in the same Redis, so one Lua script reads them, checks
both limits and counts: two replicas can never both take a tenant's last place.
"""

from __future__ import annotations

import redis.asyncio

from app.storage.redis_conn import translated
from app.storage.redis_records import PREFIX, SUMMARIES
from app.tasks.quotas import DAY_SECONDS, PENDING_SECONDS, Admission, Verdict

# How long a day's page count is kept: past its day, plus a margin for clocks that differ.
PAGES_TTL_SECONDS = 2 * DAY_SECONDS

# KEYS: the tenant's queued set (id -> pending-until, a sorted set), its pages count for the day,
# the records' summaries hash (app.storage.redis_records). ARGV: task id, queued limit (0: none),
# pages, pages limit (0: none), now, pending-until, the count's TTL, count ("0": check only, count
# nothing). Returns {0, used} (admitted, and counted unless checking), {1, queued} (queued_tasks
# refused), {2, pages used} (pages_per_day refused).
_ADMIT = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local queued = 0
for i = 1, #members, 2 do
  local id = members[i]
  local keep
  local summary = redis.call('HGET', KEYS[3], id)
  if summary then
    keep = cjson.decode(summary)['status'] == 'queued'
  else
    keep = tonumber(members[i + 1]) >= tonumber(ARGV[5])
  end
  if keep then queued = queued + 1 else redis.call('ZREM', KEYS[1], id) end
end
local queued_limit = tonumber(ARGV[2])
if queued_limit > 0 and queued >= queued_limit then return {1, queued} end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local pages_limit = tonumber(ARGV[4])
if pages_limit > 0 and used + tonumber(ARGV[3]) > pages_limit then return {2, used} end
if ARGV[8] == '0' then return {0, used} end
redis.call('ZADD', KEYS[1], ARGV[6], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {0, used}
"""

# KEYS: the queued set, the day's pages count. ARGV: task id, pages.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used > 0 then redis.call('DECRBY', KEYS[2], math.min(used, tonumber(ARGV[2]))) end
return 1
"""


def _queued_key(tenant: str) -> str:
    return f"{PREFIX}quota:queued:{tenant}"


def _pages_key(tenant: str, day: str) -> str:
    return f"{PREFIX}quota:pages:{tenant}:{day}"


class RedisBook:
    """The counts in Redis, shared by every API replica; one Lua script per admission (atomic).

    The task statuses are those of ``app.storage.redis_records``'s summaries, in the same Redis.
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)

    async def admit(
        self,
        tenant: str,
        task_id: str,
        *,
        pages: int,
        day: str,
        queued_limit: int | None,
        pages_limit: int | None,
        now: float,
        count: bool = True,
    ) -> Verdict:
        keys = [_queued_key(tenant), _pages_key(tenant, day), SUMMARIES]
        args: list[str | int | float] = [
            task_id,
            queued_limit or 0,
            pages,
            pages_limit or 0,
            now,
            now + PENDING_SECONDS,
            PAGES_TTL_SECONDS,
            1 if count else 0,
        ]
        with translated("checking a tenant's quotas"):
            code, used = await self._admit(keys=keys, args=args)
        refused = {0: None, 1: "queued_tasks", 2: "pages_per_day"}[int(code)]
        return Verdict(refused, int(used))

    async def release(self, admission: Admission) -> None:
        keys = [_queued_key(admission.tenant), _pages_key(admission.tenant, admission.day)]
        with translated("giving back a tenant's quota"):
            await self._release(keys=keys, args=[admission.task_id, admission.pages])

    async def close(self) -> None:
        await self._redis.aclose()
