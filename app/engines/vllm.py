"""The ``vllm`` backend, remote mode: DeepSeek-OCR behind an OpenAI-compatible server.

``APP_VLLM_URL`` points at ``vllm serve``, SGLang, ``transformers serve`` or anything else that
speaks the OpenAI chat-completions API. Each page is one chat completion: a user message with the
page as an ``image_url`` data URL (PNG) and the prompt as a text part, temperature 0 and
``max_tokens``. What else is sent depends on the server, because strict servers (``transformers
serve``) refuse fields they do not know:

* vLLM and SGLang get ``skip_special_tokens: false``, so the grounding tags survive decoding;
* vLLM also gets ``vllm_xargs``, the per-request arguments of the no-repeat n-gram logits
  processor that vLLM's DeepSeek-OCR recipe loads (n-gram 30 in a window of 90 tokens, ``<td>``
  and ``</td>`` exempt, since table rows legitimately repeat); a retry rung asks for a stricter
  guard through ``RecognizeOptions`` (``ngram_args``).

The server kind is ``owned_by`` of the model in ``GET /v1/models`` unless set explicitly.

The end marker: OpenAI-compatible servers report that the model emitted its end-of-sentence
token as ``finish_reason: "stop"`` and leave the token out of the text (vLLM does so even with
``skip_special_tokens: false``). The rest of the service reads a page's completeness from
``END_MARKER`` at the end of the text, as the ``hf`` engine returns it, so a page that stopped on
eos gets ``END_MARKER`` appended here when the server stripped it. We send no stop strings, so
``"stop"`` can only mean eos.

The token cap: vLLM's OpenAI front end refuses (400) any request whose prompt tokens plus
``max_tokens`` exceed the model's context, ``max_model_len``; DeepSeek-OCR's context is 8192 tokens,
so ``max_tokens: 8192`` fails every page. Each page therefore asks for the room its prompt leaves
(``TokenCap``): the context is ``max_model_len`` of the model's entry in ``GET /v1/models`` (vLLM
and SGLang report it), the prompt is bounded from above (``prompt_token_bound``: the image tokens of
the worst tile grid, the instruction's bytes, the chat template), and ``APP_VLLM_MAX_TOKENS``, when
set, is an upper bound within that room. Should the server still refuse a page for its length (a
geometry of its own, a context changed since ``start``), the engine reads the prompt's length from
the refusal and asks once more for exactly the room left; a page whose prompt alone fills the
context fails with an error that names both numbers.

Faults: connection errors, timeouts, 408/429/5xx answers and malformed bodies are retried with
exponential backoff up to ``retries`` times; then the page fails with an ``EngineError`` that names
the server and the last cause. Other 4xx answers (a wrong model name, a bad field) are not retried:
the same request would get the same answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
from PIL import Image

from app import lossless
from app.engines.async_base import ServerHealth
from app.engines.base import END_MARKER, PageText, RecognizeOptions, StopReason
from app.engines.token_budget import (
    ASSUMED_CONTEXT_TOKENS,
    DEFAULT_PROMPT_BOUND,
    ContextRefusal,
    TokenCap,
    context_refusal,
    prompt_token_bound,
    reported_context,
    served_entry,
)
from app.errors import EngineError

log = logging.getLogger(__name__)

ServerKind = Literal["auto", "vllm", "sglang", "openai"]

# vLLM's DeepSeek-OCR recipe: NGramPerReqLogitsProcessor's per-request arguments.
# 128821 and 128822 are <td> and </td> in DeepSeek-OCR's vocabulary.
NGRAM_ARGS: dict[str, Any] = {"ngram_size": 30, "window_size": 90, "whitelist_token_ids": [128821, 128822]}


def ngram_args(options: RecognizeOptions) -> dict[str, Any]:
    """The n-gram processor's arguments for one page: the recipe's (``NGRAM_ARGS``), made stricter
    where ``options`` asks (a smaller n-gram, a longer window), never looser.

    The processor bans a token that would complete an n-gram already seen in the last
    ``window_size`` tokens (vLLM's ``NGramPerReqLogitsProcessor``, after DeepSeek-OCR's own
    ``NoRepeatNGramLogitsProcessor``), so a loop whose unit is longer than ``window_size -
    ngram_size`` tokens escapes the recipe's guard; a longer window catches it.
    """
    args = dict(NGRAM_ARGS)
    if options.no_repeat_ngram_size is not None and options.no_repeat_ngram_size > 0:
        args["ngram_size"] = min(args["ngram_size"], options.no_repeat_ngram_size)
    if options.ngram_window is not None:
        args["window_size"] = max(args["window_size"], options.ngram_window)
    return args


_RETRY_STATUSES = frozenset({408, 429})  # and every 5xx
_MAX_BACKOFF_SECONDS = 10.0
_ERROR_SNIPPET_CHARS = 300  # of a server's error body, quoted in our error message

T = TypeVar("T")


class _Retryable(Exception):
    """An answer worth asking again for: a 5xx, 408, 429, or a body we cannot read."""


def normalize_base_url(url: str) -> str:
    """The server's root URL: ``http://host:8000/v1/`` and ``http://host:8000`` both give the latter."""
    url = url.strip().rstrip("/")
    return url.removesuffix("/v1")


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _describe(exc: httpx.HTTPError, timeout: float) -> str:
    """A cause a person can act on, for each way an HTTP exchange fails."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {timeout:g} s ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:_ERROR_SNIPPET_CHARS] + ("..." if len(text) > _ERROR_SNIPPET_CHARS else "")


def encode_image(image: Image.Image) -> str:
    """The page as a base64 data URL of its lossless encoding (blocking: run it in a thread).

    Lossless because the model must see the pixels rendered (``app.lossless`` says which encoding
    and why, and that every OpenAI-compatible server we know reads it). A page the pipeline
    encoded ahead (its render processes encode every page, in parallel) is sent as it is.
    """
    data = lossless.held(image)
    if data is None:
        data = lossless.encode(image)
    return f"data:{lossless.MEDIA_TYPE};base64," + base64.b64encode(data).decode("ascii")


def page_text_from_completion(payload: Any) -> PageText:
    """Translate a chat-completion body into a ``PageText`` (see the module docstring on eos).

    Raises ``_Retryable`` when the body lacks the fields every OpenAI-compatible server sends, or
    reports a finish reason other than ``stop`` or ``length`` (``abort``: the server gave up).
    """
    try:
        choice = payload["choices"][0]
        content = choice["message"]["content"]
        finish = choice["finish_reason"]
    except (KeyError, IndexError, TypeError) as exc:
        raise _Retryable(f"a malformed completion ({type(exc).__name__}: {exc})") from exc
    if content is None:
        content = ""  # a model that stops at once; some servers send null rather than ""
    if not isinstance(content, str):
        raise _Retryable(f"a malformed completion (content is {type(content).__name__})")
    stop: StopReason
    if finish == "stop":
        stop = "eos"
        if not content.endswith(END_MARKER):
            content += END_MARKER
    elif finish == "length":
        stop = "max_tokens"
    else:
        raise _Retryable(f"a completion with finish_reason {finish!r}")
    # vLLM's OpenAI server always sends usage with a completion that is not streamed; others may not.
    usage = payload.get("usage") if isinstance(payload, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return PageText(
        text=content,
        stop_reason=stop,
        tokens=tokens if isinstance(tokens, int) else 0,
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
    )


class _TooLong(EngineError):
    """The server refused a page for its context's length (``refusal`` holds what it said)."""

    def __init__(self, url: str, refusal: ContextRefusal) -> None:
        super().__init__(
            f"the OCR server at {url} refused a page as longer than its context: {refusal.answer}"
        )
        self.refusal = refusal


class RemoteEngine:
    """DeepSeek-OCR on an OpenAI-compatible server; a ``ConcurrentEngine``.

    ``start`` opens the HTTP client and asks ``GET /v1/models`` for the model name (unless
    ``model`` is given), the server kind (unless ``server_kind`` is not ``"auto"``) and the model's
    context (``max_model_len``); it raises ``EngineError`` naming the URL when the server cannot be
    reached. A server that lists no model (``transformers serve`` pinned to one checkpoint) is sent
    requests without a ``model`` field and answers with its default. ``recognize_page`` sends one
    chat completion per page asking for at most ``token_cap.max_tokens(...)`` tokens (``max_tokens``
    given here, ``None`` for no cap of our own, is an upper bound within the room the context
    leaves), each attempt bounded by ``timeout_seconds``, failed attempts retried ``retries`` times
    with exponential backoff from ``backoff_seconds``, and a refusal for length once, with the room
    the server's own count leaves.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None,
        api_key: str | None,
        concurrency: int,
        max_tokens: int | None,
        timeout_seconds: float,
        retries: int,
        server_kind: ServerKind = "auto",
        backoff_seconds: float = 0.5,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {max_tokens}")
        self.url = normalize_base_url(base_url)
        self.model_name = model or f"{self.url} (model not yet asked)"
        self.max_concurrency = concurrency
        self.server_kind: ServerKind = server_kind
        self.token_cap = TokenCap(ASSUMED_CONTEXT_TOKENS, reported=False, configured=max_tokens)
        self._model = model
        self._request_model = model  # what requests name; settled by start()
        self._configured_kind = server_kind
        self._api_key = api_key
        self._timeout = timeout_seconds
        self._retries = retries
        self._backoff = backoff_seconds
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Open the client and learn the model, server kind and context; no-op when started."""
        if self._client is not None:
            return
        client = httpx.AsyncClient(
            base_url=self.url,
            headers=_auth_headers(self._api_key),
            timeout=httpx.Timeout(self._timeout, connect=min(self._timeout, 10.0)),
            # The ModelManager keeps at most max_concurrency requests in flight; one connection each.
            limits=httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            ),
        )
        try:
            listed = await self._call("GET /v1/models", lambda: client.get("/v1/models"), _models_listed)
        except BaseException:
            await client.aclose()
            raise
        self._adopt(listed)
        self._client = client
        log.info(
            "OCR server %s: model %s, server kind %s; a default page asks for %d tokens (%s)",
            self.url,
            self.model_name,
            self.server_kind,
            self.token_cap.max_tokens(DEFAULT_PROMPT_BOUND),
            self.token_cap.source(DEFAULT_PROMPT_BOUND),
        )

    def _adopt(self, listed: list[dict[str, Any]]) -> None:
        """Pick the model, the server kind and the context from ``/v1/models``' entries."""
        ids = [entry["id"] for entry in listed]
        if self._model is not None and ids and self._model not in ids:
            log.warning("OCR server %s does not list model %r (it lists %s)", self.url, self._model, ids)
        model = self._model or (ids[0] if ids else None)
        self.model_name = model or f"{self.url} (the server's default model)"
        if self._configured_kind == "auto":
            owner = served_entry(listed, model).get("owned_by")
            self.server_kind = owner if owner in ("vllm", "sglang") else "openai"
        self._request_model = model
        context = reported_context(listed, model)
        self.token_cap = TokenCap(
            context or ASSUMED_CONTEXT_TOKENS,
            reported=context is not None,
            configured=self.token_cap.configured,
        )

    async def stop(self) -> None:
        """Close the HTTP client; the next ``start`` asks the server again."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def request_body(
        self, data_url: str, prompt: str, max_tokens: int, xargs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The chat-completion body for one page, with the extras this server kind accepts
        (``xargs``: the n-gram processor's arguments for vLLM, ``NGRAM_ARGS`` when ``None``)."""
        body: dict[str, Any] = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "temperature": 0.0,
            "max_tokens": max_tokens,
        }
        if self._request_model is not None:
            body["model"] = self._request_model
        if self.server_kind in ("vllm", "sglang"):
            body["skip_special_tokens"] = False
        if self.server_kind == "vllm":
            body["vllm_xargs"] = NGRAM_ARGS if xargs is None else xargs
        return body

    async def recognize_page(self, image: Image.Image, options: RecognizeOptions) -> PageText:
        """One chat completion for ``image``; ``options.prompt`` is the text part.

        ``max_new_tokens`` and ``timeout_seconds`` of ``options`` do not apply: this engine's own
        token cap and ``timeout_seconds`` do (``APP_VLLM_MAX_TOKENS``, ``APP_VLLM_TIMEOUT_SECONDS``);
        ``options.token_limit`` lowers that cap, and its n-gram fields go to vLLM (``ngram_args``).
        The size options only bound the prompt's length: the server decides the image geometry.
        Raises ``EngineError``; for a page the server finds too long even after the second try, or
        whose prompt alone fills the context, one that names the token counts.
        """
        client = self._client
        if client is None:
            raise EngineError(f"the engine for the OCR server at {self.url} is not started")
        data_url = await asyncio.to_thread(encode_image, image)
        bound = prompt_token_bound(
            options.prompt,
            base_size=options.base_size,
            image_size=options.image_size,
            crop_mode=options.crop_mode,
        )
        limit = options.token_limit
        body = self.request_body(
            data_url, options.prompt, _lower(self.token_cap.max_tokens(bound), limit), ngram_args(options)
        )

        def send() -> Awaitable[httpx.Response]:
            return client.post("/v1/chat/completions", json=body)

        try:
            return await self._call("a page", send, _completion_page)
        except _TooLong as exc:
            asked = body["max_tokens"]
            body["max_tokens"] = _lower(self._room_left(exc.refusal, asked), limit)
            log.info(
                "OCR server %s refused a page asking for %d tokens; asking again for %d, the room its "
                "context of %d leaves after the page's %d prompt tokens",
                self.url,
                asked,
                body["max_tokens"],
                exc.refusal.context,
                exc.refusal.prompt_tokens,
            )
        try:
            return await self._call("a page", send, _completion_page)
        except _TooLong as exc:
            raise EngineError(
                f"the OCR server at {self.url} refused a page twice as longer than its context "
                f"({exc.refusal.context} tokens), the second time asking for {body['max_tokens']} "
                f"tokens, the room its first answer left: {exc.refusal.answer}"
            ) from exc

    def _room_left(self, refusal: ContextRefusal, asked: int) -> int:
        """``max_tokens`` for the second try at a page the server refused for length.

        Adopts the context the server stated (it may have restarted with another ``max_model_len``
        since ``start``). Raises ``EngineError`` when the server did not say the prompt's length, or
        when the prompt alone leaves no room.
        """
        cap = self.token_cap
        if refusal.context != cap.context:
            log.warning(
                "OCR server %s states a context of %d tokens, not %d; pages now ask for what it leaves",
                self.url,
                refusal.context,
                cap.context,
            )
        if (refusal.context, True) != (cap.context, cap.reported):
            self.token_cap = TokenCap(refusal.context, reported=True, configured=cap.configured)
        prompt = refusal.prompt_tokens
        if prompt is None:
            raise EngineError(
                f"the OCR server at {self.url} refused a page asking for {asked} tokens as longer than "
                f"its context ({refusal.context} tokens) without saying the prompt's length: "
                f"{refusal.answer}"
            )
        room = refusal.context - prompt
        if room < 1:
            size = f"at least {prompt}" if refusal.at_least else str(prompt)
            raise EngineError(
                f"the page's prompt alone (its image and the instruction) is {size} tokens and the OCR "
                f"server at {self.url} has a context (max_model_len) of {refusal.context}: no room is "
                "left for the page's text; serve the model with a larger --max-model-len"
            )
        configured = self.token_cap.configured
        return room if configured is None else min(configured, room)

    async def _call(
        self,
        what: str,
        send: Callable[[], Awaitable[httpx.Response]],
        parse: Callable[[httpx.Response], T],
    ) -> T:
        """``send`` until ``parse`` accepts the answer, retrying what is worth retrying.

        Raises ``_TooLong`` for a refusal for length (the caller decides), ``EngineError`` for any
        other refusal or when the retries run out.
        """
        attempts = self._retries + 1
        cause = ""
        for attempt in range(1, attempts + 1):
            try:
                response = await send()
                if response.status_code in _RETRY_STATUSES or response.status_code >= 500:
                    raise _Retryable(f"HTTP {response.status_code}: {_snippet(response)}")
                if response.is_error:
                    refusal = context_refusal(response.status_code, response.text, _snippet(response))
                    if refusal is not None:
                        raise _TooLong(self.url, refusal)
                    raise EngineError(
                        f"the OCR server at {self.url} refused {what}: "
                        f"HTTP {response.status_code}: {_snippet(response)}"
                    )
                return parse(response)
            except httpx.HTTPError as exc:
                cause = _describe(exc, self._timeout)
            except _Retryable as exc:
                cause = str(exc)
            if attempt < attempts:
                # Jitter spreads the retries of many pages that failed together.
                delay = min(self._backoff * 2 ** (attempt - 1), _MAX_BACKOFF_SECONDS)
                delay *= random.uniform(0.75, 1.25)  # noqa: S311 - jitter, not cryptography
                log.warning(
                    "OCR server %s, %s, attempt %d/%d: %s; retrying in %.1f s",
                    self.url,
                    what,
                    attempt,
                    attempts,
                    cause,
                    delay,
                )
                await asyncio.sleep(delay)
        raise EngineError(f"the OCR server at {self.url} failed {what} after {attempts} attempt(s): {cause}")


def _lower(cap: int, limit: int | None) -> int:
    """``cap``, lowered to ``limit`` when there is one."""
    return cap if limit is None else min(cap, limit)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise _Retryable(f"a body that is not JSON ({_snippet(response)!r})") from exc


def _models_listed(response: httpx.Response) -> list[dict[str, Any]]:
    payload = _json(response)
    entries = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("id"), str) for e in entries
    ):
        raise _Retryable("a malformed model list")
    return entries


def _completion_page(response: httpx.Response) -> PageText:
    return page_text_from_completion(_json(response))


@dataclass(frozen=True)
class RemoteServerHealth(ServerHealth):
    """``ServerHealth`` with the server's context and the token cap a page gets from it (for /readyz)."""

    max_model_len: int | None  # as /v1/models reports it; None: not reported (or not reached)
    max_tokens: int | None  # what a page in the default mode asks for; None: the server was not reached
    max_tokens_source: str  # where that number comes from, in words


async def check_server(
    base_url: str,
    *,
    api_key: str | None,
    timeout_seconds: float,
    model: str | None = None,
    max_tokens: int | None = None,
    prompt_bound: int = DEFAULT_PROMPT_BOUND,
) -> RemoteServerHealth:
    """Ask ``GET /v1/models`` once (no retries): whether the server answers, for /readyz, and the
    cap a page with a prompt of at most ``prompt_bound`` tokens gets from the context it reports,
    worked out as ``RemoteEngine`` does for ``model`` and ``max_tokens``."""
    url = normalize_base_url(base_url)
    started = time.perf_counter()
    headers = _auth_headers(api_key)
    unknown = "not known until the server answers GET /v1/models"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_seconds) as client:
        try:
            response = await client.get("/v1/models")
        except httpx.HTTPError as exc:
            return RemoteServerHealth(url, False, _describe(exc, timeout_seconds), None, None, unknown)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        detail = f"HTTP {response.status_code}: {_snippet(response)}"
        return RemoteServerHealth(url, False, detail, None, None, unknown)
    try:
        context = reported_context(_models_listed(response), model)
    except _Retryable:
        context = None  # not an OpenAI model list: nothing reported, the engine assumes the model's own
    cap = TokenCap(context or ASSUMED_CONTEXT_TOKENS, reported=context is not None, configured=max_tokens)
    return RemoteServerHealth(
        url,
        True,
        f"answered in {elapsed_ms:.0f} ms",
        context,
        cap.max_tokens(prompt_bound),
        cap.source(prompt_bound),
    )
