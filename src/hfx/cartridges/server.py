"""A client for any OpenAI-compatible chat server (vLLM, SGLang, TGI, ``transformers serve``, hosted APIs).

Synthesis sends its two agents' turns here instead of generating locally. Requests go through the ``openai``
client, which retries what can succeed on a second try (connection errors, timeouts, 408/409/429 and 5xx, honouring
``Retry-After``) with exponential backoff; hfx bounds the requests in flight (``max_concurrency``) and turns a final
failure into an error naming the server, the attempts and the last error. Top log-probabilities are requested and
returned with token ids when the server gives ids (vLLM's ``token_id:N`` form, or a token string that is exactly one
vocabulary entry); otherwise the caller re-scores the answer locally.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

LOGPROBS_MODES = ("auto", "never")


class ServerError(RuntimeError):
    """The server could not be reached or kept failing; the message says which server, how often and why."""


@dataclass
class ServerArguments:
    """Generate with an OpenAI-compatible server instead of the local model (``--server_url``)."""

    server_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (a bare host:port "
            "gets /v1). Unset: generate locally."
        },
    )
    server_model: str | None = field(
        default=None,
        metadata={
            "help": "The model name the server knows the base model by (default: the base model's path)."
        },
    )
    server_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the API key (sent as a Bearer token when set)."},
    )
    server_max_concurrency: int = field(default=8, metadata={"help": "Requests in flight at most."})
    server_max_retries: int = field(
        default=4, metadata={"help": "Retries of a failed request (connection error, timeout, 429, 5xx)."}
    )
    server_timeout: float = field(
        default=120.0, metadata={"help": "Seconds per request before it counts as failed."}
    )
    server_logprobs: str = field(
        default="auto",
        metadata={
            "help": "auto: ask for top log-probs and use them when the server returns them with token ids; "
            "never: do not ask. Answers without usable log-probs are re-scored by the local teacher."
        },
    )
    server_extra_body: str | None = field(
        default=None,
        metadata={
            "help": "JSON object merged into every request body, for server-specific options; e.g. "
            "transformers serve samples only with "
            '\'{"generation_config": "{\\"do_sample\\": true}"}\'.'
        },
    )
    rescore_batch_size: int = field(
        default=8, metadata={"help": "Conversations per local re-scoring forward pass."}
    )

    def __post_init__(self):
        if self.server_logprobs not in LOGPROBS_MODES:
            raise ValueError(
                f"server_logprobs must be one of {LOGPROBS_MODES}, got {self.server_logprobs!r}."
            )
        for name in ("server_max_concurrency", "rescore_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.server_max_retries < 0 or self.server_timeout <= 0:
            raise ValueError("server_max_retries must be >= 0 and server_timeout > 0.")
        if isinstance(self.server_extra_body, str):
            try:
                parsed = json.loads(self.server_extra_body)
            except json.JSONDecodeError as err:
                raise ValueError(f"server_extra_body is not valid JSON ({err.msg}).") from None
            if not isinstance(parsed, dict):
                raise ValueError("server_extra_body must be a JSON object.")

    @property
    def extra_body(self) -> dict:
        if not self.server_extra_body:
            return {}
        return json.loads(self.server_extra_body)


def normalize_base_url(url: str) -> str:
    """``http://host:port`` -> ``http://host:port/v1``; a URL with a path is kept as given (minus a trailing /)."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"server_url {url!r} is not an http(s) URL.")
    base = parsed.geturl().rstrip("/")
    if parsed.path in ("", "/"):
        base += "/v1"
    return base


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    #: Per generated token: (token id, top-k ids, top-k log-probs); None when the server gave no usable ids.
    tokens: list[tuple[int, list[int], list[float]]] | None = None


class TokenIds:
    """Maps the token strings a server returns in log-probs back to vocabulary ids, when that is unambiguous."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab()
        self._decoded: dict[str, int] | None = None

    @property
    def decoded(self) -> dict[str, int]:
        """Decoded text -> id for every token whose text is unique (built on first use: servers that give ids,
        or no log-probs at all, never need it)."""
        if self._decoded is None:
            decoded: dict[str, int] = {}
            ambiguous: set[str] = set()
            for token_id in range(len(self.tokenizer)):
                text = self.tokenizer.decode([token_id])
                if text in decoded:
                    ambiguous.add(text)
                decoded[text] = token_id
            for text in ambiguous:
                decoded.pop(text, None)
            self._decoded = decoded
        return self._decoded

    def __call__(self, token: str) -> int | None:
        if token.startswith("token_id:"):
            try:
                return int(token[len("token_id:") :])
            except ValueError:
                return None
        if token in self.vocab:
            return self.vocab[token]
        return self.decoded.get(token)


class ChatClient:
    """Thread-safe client: ``complete`` one request, ``complete_many`` a list with at most ``max_concurrency`` in flight."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        max_retries: int = 4,
        timeout: float = 120.0,
        extra_body: dict | None = None,
        token_ids: TokenIds | None = None,
    ):
        import openai

        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.max_retries = max_retries
        self.extra_body = dict(extra_body or {})
        self.token_ids = token_ids
        # A server without authentication ignores the key; the openai client needs one to send.
        self._openai = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "EMPTY", max_retries=max_retries, timeout=timeout
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="hfx-server")
        self._closed = threading.Event()
        self._lock = threading.Lock()
        #: HTTP requests sent and retries among them, over the requests that succeeded.
        self.stats = {"requests": 0, "retries": 0}

    @classmethod
    def from_arguments(cls, args: ServerArguments, default_model: str, tokenizer=None) -> ChatClient:
        return cls(
            args.server_url,
            args.server_model or default_model,
            api_key=os.environ.get(args.server_api_key_env) or None,
            max_concurrency=args.server_max_concurrency,
            max_retries=args.server_max_retries,
            timeout=args.server_timeout,
            extra_body=args.extra_body,
            token_ids=TokenIds(tokenizer)
            if tokenizer is not None and args.server_logprobs == "auto"
            else None,
        )

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._openai.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _post(self, body: dict) -> dict:
        """The server's JSON answer to one chat-completion request (retried by the openai client)."""
        import openai

        url = f"{self.base_url}/chat/completions"
        if self._closed.is_set():
            raise ServerError(f"{url}: client closed.")
        attempts = f"failed after {self.max_retries + 1} attempts"
        known = ("model", "messages", "max_tokens", "temperature", "seed", "logprobs", "top_logprobs")
        try:
            response = self._openai.chat.completions.with_raw_response.create(
                **{k: v for k, v in body.items() if k in known},
                extra_body={k: v for k, v in body.items() if k not in known} or None,
            )
        except openai.APIStatusError as err:
            text = err.response.text[:500]
            if err.response.status_code in (408, 409, 429) or err.response.status_code >= 500:
                raise ServerError(f"{url}: {attempts}; last error: HTTP {err.status_code}: {text}") from err
            raise ServerError(f"{url} refused the request (HTTP {err.status_code}): {text}") from err
        except openai.APIConnectionError as err:  # connection refused or reset, timeouts
            cause = err.__cause__ or err
            last = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
            raise ServerError(f"{url}: {attempts}; last error: {last}") from err
        with self._lock:
            self.stats["requests"] += response.retries_taken + 1
            self.stats["retries"] += response.retries_taken
        try:
            return response.http_response.json()
        except ValueError:
            raise ServerError(
                f"{url}: HTTP 200 with a body that is not JSON: {response.http_response.text[:200]!r}"
            ) from None

    def complete(
        self,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        top_logprobs: int | None = None,
    ) -> Completion:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            **({"seed": seed} if seed is not None else {}),
            **({"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}),
            **self.extra_body,
        }
        payload = self._post(body)
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ServerError(
                f"{self.base_url}/chat/completions answered without choices[0].message.content: "
                f"{json.dumps(payload)[:300]}"
            ) from None
        tokens = self._parse_logprobs(choice.get("logprobs"), top_logprobs) if top_logprobs else None
        return Completion(text=text, finish_reason=choice.get("finish_reason"), tokens=tokens)

    def _parse_logprobs(self, logprobs, k: int) -> list[tuple[int, list[int], list[float]]] | None:
        """Per-token (id, top-k ids, top-k log-probs), or None unless every token and alternative maps to an id."""
        if not logprobs or not logprobs.get("content") or self.token_ids is None:
            return None
        tokens = []
        for entry in logprobs["content"]:
            token_id = self.token_ids(entry.get("token", ""))
            top = entry.get("top_logprobs") or []
            if token_id is None or len(top) < k:
                return None
            ids = [self.token_ids(alt.get("token", "")) for alt in top[:k]]
            if any(i is None for i in ids):
                return None
            tokens.append((token_id, ids, [float(alt["logprob"]) for alt in top[:k]]))
        return tokens

    def complete_many(self, requests: list[dict]) -> list[Completion]:
        """``complete(**request)`` for each request, at most ``max_concurrency`` at once; results in order."""
        futures = [self._pool.submit(self.complete, **request) for request in requests]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
