"""Share links: a signed, expiring URL for one result file of one task, usable without an API key.

A link is ``/v1/shared/<task_id>/<name>?expires=<unix seconds>&signature=<hex>``, where the
signature is HMAC-SHA256 of ``"<task_id>\\n<name>\\n<expires>"`` under the server's link secret.
Nothing is stored: the signature proves this service issued the link for exactly that task, file
and expiry, so changing any of them breaks it. Changing the secret revokes every link at once.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

from app.errors import LinkExpired, LinkInvalid

SHARE_PREFIX = "/v1/shared"


class LinkSigner:
    """Issues and checks share links with one secret; keeps no state besides the secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _signature(self, task_id: str, name: str, expires: int) -> str:
        message = f"{task_id}\n{name}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def path(self, task_id: str, name: str, expires: int) -> str:
        """The link's path and query, relative to the service root."""
        query = urlencode({"expires": expires, "signature": self._signature(task_id, name, expires)})
        return f"{SHARE_PREFIX}/{task_id}/{name}?{query}"

    def verify(
        self, task_id: str, name: str, expires: str | None, signature: str | None, *, now: float | None = None
    ) -> None:
        """Accept a link only as issued and before its expiry.

        Raises ``LinkInvalid`` for a missing or wrong signature or a malformed expiry, and
        ``LinkExpired`` once ``expires`` has passed. The signature is compared in constant time and
        checked before the expiry, so an unsigned request learns nothing.
        """
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
        if not expires or not signature or not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            raise LinkInvalid("the share link is incomplete or malformed")
        expected = self._signature(task_id, name, int(expires))
        # Bytes, not str: compare_digest refuses non-ASCII text, and the signature is user input.
        if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
            raise LinkInvalid("the share link's signature does not match; ask for a new link")
        if int(expires) <= (time.time() if now is None else now):
            raise LinkExpired("the share link has expired; ask for a new link")
