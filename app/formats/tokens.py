"""Counting tokens for chunks: a Hugging Face tokenizer found locally, or a character estimate.

A ``TokenCounter`` counts and also says where the n-th token ends or the last n begin, so a long
paragraph is cut exactly at the budget instead of by trial and error.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from app.errors import InvalidOptions

if TYPE_CHECKING:
    from tokenizers import Tokenizer

CHARS = "chars"  # the name of the character estimate
CHARS_PER_TOKEN = 4  # the usual estimate for English text with GPT-style BPE vocabularies
# A Hub repository id ("org/name" or "name"), never a path: a request must not make the service
# read tokenizer files from wherever it likes on its disk.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class TokenCounter(Protocol):
    """Counts the tokens of a text, without special tokens (no BOS/EOS)."""

    @property
    def name(self) -> str:
        """What counted: the tokenizer's repository id, or ``"chars"``."""
        ...

    def count(self, text: str) -> int:
        """How many tokens ``text`` has."""
        ...

    def prefix_end(self, text: str, tokens: int) -> int:
        """The offset where ``text``'s first ``tokens`` tokens end (``len(text)`` if it has fewer)."""
        ...

    def suffix_start(self, text: str, tokens: int) -> int:
        """The offset where ``text``'s last ``tokens`` tokens begin (0 if it has fewer)."""
        ...


class CharEstimate:
    """One token per ``CHARS_PER_TOKEN`` characters, rounded up: free, and no model needed."""

    name = CHARS

    def count(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def prefix_end(self, text: str, tokens: int) -> int:
        return min(len(text), max(0, tokens) * CHARS_PER_TOKEN)

    def suffix_start(self, text: str, tokens: int) -> int:
        return max(0, len(text) - max(0, tokens) * CHARS_PER_TOKEN)


class HubTokenizer:
    """A fast Hugging Face tokenizer; thread-safe (its settings are fixed when it is loaded)."""

    def __init__(self, name: str, tokenizer: Tokenizer) -> None:
        self._name = name
        self._tokenizer = tokenizer

    @property
    def name(self) -> str:
        return self._name

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def prefix_end(self, text: str, tokens: int) -> int:
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        if tokens >= len(offsets):
            return len(text)
        return 0 if tokens <= 0 else offsets[tokens][0]

    def suffix_start(self, text: str, tokens: int) -> int:
        offsets = self._tokenizer.encode(text, add_special_tokens=False).offsets
        if tokens >= len(offsets):
            return 0
        return len(text) if tokens <= 0 else offsets[-tokens][0]


def load_counter(name: str | None, *, cache_dir: Path | None = None) -> TokenCounter:
    """The counter a request names: ``None`` or ``"chars"`` for the estimate, else a Hub repository
    id whose tokenizer is already in the local Hugging Face cache (``cache_dir``, or the default
    one); nothing is downloaded. Blocking (reads files) the first time a name is used; loaded
    tokenizers are kept for the process.

    Raises ``InvalidOptions`` for a name that is not a repository id (paths are refused), is not
    cached, or has no fast tokenizer (a slow one gives no character offsets).
    """
    if name is None or name == CHARS:
        return CharEstimate()
    if not _REPO_ID.match(name) or ".." in name:
        raise InvalidOptions(f"tokenizer must be {CHARS!r} or a Hugging Face repository id, not {name!r}")
    return _load_hub(name, None if cache_dir is None else str(cache_dir))


@functools.lru_cache(maxsize=8)
def _load_hub(name: str, cache_dir: str | None) -> HubTokenizer:
    # Imported here: transformers takes seconds to import, and only this needs it.
    from huggingface_hub import snapshot_download
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    try:
        # The cached snapshot's folder, found by repository id alone: handing the name itself to
        # from_pretrained would load a folder of that name under the working directory first.
        folder = snapshot_download(name, local_files_only=True, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # A missing snapshot is a FileNotFoundError; from_pretrained reports a folder without a
    # tokenizer as OSError or ValueError, and a config naming an unknown class as KeyError or
    # AttributeError; all mean the same to a user.
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        # The libraries' messages name cache paths and hosts: not for the client.
        raise InvalidOptions(
            f"tokenizer {name!r} is not in this server's Hugging Face cache (nothing is downloaded)"
        ) from exc
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise InvalidOptions(f"tokenizer {name!r} has no fast (Rust) version, which chunking needs")
    # A copy without truncation or padding: a tokenizer.json may set either, and counting must see
    # every token. The copy is never changed again, so threads can share it (transformers' own
    # __call__ resets these settings on every call, which fails under concurrent use).
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return HubTokenizer(name, own)
