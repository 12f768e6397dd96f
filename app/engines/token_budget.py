"""How many tokens one page may ask an OpenAI-compatible server for, and reading its refusals.

vLLM's OpenAI front end refuses (400) any request whose prompt tokens plus ``max_tokens`` exceed
the model's context, ``max_model_len``; DeepSeek-OCR's context is 8192 tokens, so ``max_tokens:
8192`` fails every page. ``TokenCap`` is the room a page's prompt leaves in the context the server
reports (``reported_context``), with the prompt bounded from above (``prompt_token_bound``), and
``context_refusal`` reads the numbers back out of a refusal in any wording vLLM has used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

ASSUMED_CONTEXT_TOKENS = 8192
"""DeepSeek-OCR's own context (``max_position_embeddings`` of its language model): the base of
the cap when a server does not report ``max_model_len``."""

# vLLM's DeepSeek-OCR processor fixes its own geometry whatever a request asks for
# (vllm/transformers_utils/processors/deepseek_ocr.py: BASE_SIZE 1024, IMAGE_SIZE 640, CROP_MODE
# True, MIN_CROPS 2, MAX_CROPS 6), so on vLLM a page costs what this mode costs, in any task mode.
VLLM_MODE = (1024, 640, True)
_TILES = (2, 6)  # the fewest and most tiles of a cropped page (MIN_CROPS, MAX_CROPS)
_TEMPLATE_TOKENS = 32  # BOS, the chat template's role markers, the image placeholder, newlines; margin
_SHORT_PROMPT_BYTES = 64  # every built-in prompt is shorter (the longest, "document", has 47 bytes)


def _tokens_a_side(pixels: int) -> int:
    # 16 px patches, 4x4 of them per token (DeepseekOCRProcessingInfo.get_num_image_tokens in
    # vllm/model_executor/models/deepseek_ocr.py, as DeepSeek-OCR's own image_process.py counts).
    return math.ceil((pixels // 16) / 4)


def image_token_bound(base_size: int, image_size: int, crop_mode: bool) -> int:
    """The most image tokens DeepSeek-OCR spends on one page in this mode, whatever the page's shape.

    The global view (``base_size`` px square, ``q`` tokens a side) costs ``q`` rows of ``q + 1``
    tokens (a newline ends each row) and a separator. With ``crop_mode``, a grid of ``cols`` x
    ``rows`` tiles (``image_size`` px, ``t`` tokens a side) adds ``rows * t`` rows of
    ``cols * t + 1``; the worst grid of 2 to 6 tiles is one column of six. Gundam (1024, 640, crop):
    273 + 660 = 933.
    """
    q = _tokens_a_side(base_size)
    tokens = q * (q + 1) + 1
    if crop_mode:
        t = _tokens_a_side(image_size)
        fewest, most = _TILES
        tokens += max(
            rows * t * (cols * t + 1)
            for cols in range(1, most + 1)
            for rows in range(1, most + 1)
            if fewest <= cols * rows <= most
        )
    return tokens


def prompt_token_bound(prompt: str | None, *, base_size: int, image_size: int, crop_mode: bool) -> int:
    """An upper bound of one page's prompt tokens: the image, the instruction and the chat template.

    The image part is the larger of this mode's worst case and that of vLLM's fixed mode (vLLM
    ignores the task's mode, another server may not). The instruction costs at most one token per
    UTF-8 byte (DeepSeek's tokenizer is byte-level BPE); a built-in one is counted as
    ``_SHORT_PROMPT_BYTES``, so every built-in prompt gets the same cap.
    """
    image = max(image_token_bound(base_size, image_size, crop_mode), image_token_bound(*VLLM_MODE))
    text = max(len(prompt.encode("utf-8")) if prompt else 0, _SHORT_PROMPT_BYTES)
    return image + text + _TEMPLATE_TOKENS


DEFAULT_PROMPT_BOUND = prompt_token_bound(None, base_size=1024, image_size=640, crop_mode=True)
"""The bound for a page in the default mode (Gundam) with a built-in prompt."""


@dataclass(frozen=True)
class TokenCap:
    """How many tokens one page may ask a server for, and why.

    ``context`` is the server's ``max_model_len`` when it reports one (``reported``), else
    ``ASSUMED_CONTEXT_TOKENS``. Where the server says nothing, pages still carry a ``max_tokens``
    rather than none: an omitted cap is the server's choice, and ``transformers serve`` then stops
    at 1024 new tokens, mid-page on dense pages; and no server gives DeepSeek-OCR more context than
    the model's own, so the room that context leaves cannot overflow one that serves the whole
    model. ``configured`` (``APP_VLLM_MAX_TOKENS``) is an upper bound within that room.
    """

    context: int
    reported: bool
    configured: int | None

    def room(self, prompt_bound: int) -> int:
        """The context left after a prompt of ``prompt_bound`` tokens; at least 1, since the bound
        is only a bound: the server has the exact count, and says it if the page does not fit."""
        return max(1, self.context - prompt_bound)

    def max_tokens(self, prompt_bound: int) -> int:
        """``max_tokens`` for a page whose prompt has at most ``prompt_bound`` tokens."""
        room = self.room(prompt_bound)
        return room if self.configured is None else min(self.configured, room)

    def source(self, prompt_bound: int) -> str:
        """Where ``max_tokens(prompt_bound)`` comes from, in words (shown by /readyz)."""
        if self.reported:
            context = f"max_model_len {self.context} from /v1/models"
        else:
            context = f"DeepSeek-OCR's own context of {self.context} (the server reports no max_model_len)"
        room = f"{context}, less up to {prompt_bound} tokens of prompt"
        if self.configured is None:
            return f"clamped to {room}"
        if self.configured <= self.room(prompt_bound):
            return f"APP_VLLM_MAX_TOKENS={self.configured}, within {room}"
        return f"APP_VLLM_MAX_TOKENS={self.configured} clamped to {room}"


def served_entry(listed: list[dict[str, Any]], model: str | None) -> dict[str, Any]:
    """The ``/v1/models`` entry of ``model``, else the first one (``{}`` when none is listed)."""
    return next((e for e in listed if e["id"] == model), listed[0] if listed else {})


def reported_context(listed: list[dict[str, Any]], model: str | None) -> int | None:
    """The ``max_model_len`` that ``/v1/models`` reports for ``model``, if any.

    vLLM's ModelCard carries it on base models; a LoRA adapter's card has none but names its base
    model as ``parent``, whose context it shares.
    """
    entry = served_entry(listed, model)
    parent = entry.get("parent")
    for candidate in (entry, next((e for e in listed if parent and e["id"] == parent), {})):
        value = candidate.get("max_model_len")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class ContextRefusal:
    """A server's 400 for a request longer than its context, with the numbers it gave."""

    context: int  # the server's max_model_len
    prompt_tokens: int | None  # the prompt's length, when the message says it
    at_least: bool  # the server stopped counting: the prompt has at least ``prompt_tokens``
    answer: str  # the server's body, abridged, for error messages


# Every wording of vLLM's refusals for length, old and new, so that the numbers are read from any
# release. The context, as the message states it:
_CONTEXT_SAID = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        # "This model's maximum context length is 8192 tokens. ...": OpenAIServing._validate_input
        # (entrypoints/openai/serving_engine.py), then TokenizeParams._token_len_check (renderers/params.py)
        r"maximum context length is (\d+) tokens",
        # "Input length (9000) exceeds model's maximum context length (8192).": get_max_tokens
        # (entrypoints/utils.py), on the prompt with its image tokens
        r"maximum context length \((\d+)\)",
        # "The decoder prompt (length 9000) is longer than the maximum model length of 8192.":
        # InputProcessor._validate_prompt_len (v1/engine/input_processor.py)
        r"maximum model length of (\d+)",
        # "... However, the model's context length is only 8192 tokens ...": an earlier
        # TokenizeParams._token_len_check
        r"context length is only (\d+) tokens",
    )
]
# The prompt's length, as the same messages state it (group "n"; "least" when it is a lower bound,
# the prompt having been cut while it was counted):
_PROMPT_SAID = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"prompt contains (?P<least>at least )?(?P<n>\d+) input tokens",  # TokenizeParams, current
        r"request has (?P<n>\d+) input tokens",  # _validate_input: "'max_tokens' ... is too large"
        r"\((?P<n>\d+) in the messages",  # older _validate_input: "(1015 in the messages, 8192 in ...)"
        r"requested (?P<n>\d+) tokens in the messages",  # older _validate_input, the prompt alone
        r"you passed (?P<n>\d+) input tokens",  # the earlier TokenizeParams
        r"input length \((?P<n>\d+)\)",  # get_max_tokens
        r"decoder prompt \(length (?P<n>\d+)\)",  # _validate_prompt_len
    )
]


def context_refusal(status_code: int, text: str, answer: str) -> ContextRefusal | None:
    """Read a server's answer (``text``, abridged as ``answer`` for messages) as a 400 refusal for
    length, or ``None`` when it is another status or another kind of 400."""
    if status_code != 400:
        return None
    context = next((int(m.group(1)) for p in _CONTEXT_SAID if (m := p.search(text))), None)
    if context is None:
        return None
    said = next((m for p in _PROMPT_SAID if (m := p.search(text))), None)
    return ContextRefusal(
        context=context,
        prompt_tokens=int(said.group("n")) if said else None,
        at_least=bool(said and said.groupdict().get("least")),
        answer=answer,
    )
