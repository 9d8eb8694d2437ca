"""asyncio client of the CaptchaAI protocol (2captcha-compatible ``in.php`` / ``res.php``).

Every request is a POST with ``json=1``; the key travels only in the form body, never in a URL.
:class:`ProviderClient` does single HTTP calls and classifies the answers; the scheduling
(backoff, first-poll delay, one bulk ``res.php`` call per tick) lives in
:mod:`captcha_solver.dispatcher`.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from .config import ProviderConfig
from .metrics import Metrics
from .secret import Secret

log = logging.getLogger(__name__)

NOT_READY = "CAPCHA_NOT_READY"


class ErrorKind(enum.StrEnum):
    RETRYABLE = "retryable"  # try again later (same key)
    FATAL = "fatal"  # the task itself is bad or unsolvable: give up
    KEY_PROBLEM = "key_problem"  # the key (or this host) is the problem


class KeyProblem(enum.StrEnum):
    REJECTED = "rejected"  # key invalid / revoked: refresh from Vault
    EXHAUSTED = "exhausted"  # out of balance or not allowed: switch to a backup key
    BANNED = "banned"  # this host is banned: stop calling


_KEY_CODES: dict[str, KeyProblem] = {
    "ERROR_WRONG_USER_KEY": KeyProblem.REJECTED,
    "ERROR_KEY_DOES_NOT_EXIST": KeyProblem.REJECTED,
    "ERROR_ZERO_BALANCE": KeyProblem.EXHAUSTED,
    "ERROR_IP_NOT_ALLOWED": KeyProblem.EXHAUSTED,
    "ERROR_ACCOUNT_SUSPENDED": KeyProblem.EXHAUSTED,
    "IP_BANNED": KeyProblem.BANNED,
    "ERROR_IP_BANNED": KeyProblem.BANNED,
}
_RETRYABLE_CODES = frozenset(
    {
        "ERROR_NO_SLOT_AVAILABLE",
        "MAX_USER_TURN",
        "ERROR_TOO_MUCH_REQUESTS",
        "HTTP_5XX",
        "HTTP_429",
        "UNPARSEABLE",
        "NETWORK",
        "TIMEOUT",
    }
)


def classify(code: str) -> tuple[ErrorKind, KeyProblem | None]:
    if code in _KEY_CODES:
        return ErrorKind.KEY_PROBLEM, _KEY_CODES[code]
    if code in _RETRYABLE_CODES or code.startswith("ERROR_TOO_MUCH_REQUESTS"):
        return ErrorKind.RETRYABLE, None
    return ErrorKind.FATAL, None


class ProviderError(Exception):
    """An error answer or a failed call. ``code`` is the provider's code (or ours)."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}{': ' + detail if detail else ''}")
        self.code = code
        self.kind, self.key_problem = classify(code)


@dataclass(frozen=True, slots=True)
class TaskResult:
    """One entry of a (bulk) res.php answer: token, or error code, or not ready."""

    ready: bool
    token: str | None = None
    error: str | None = None


_PENDING = TaskResult(ready=False)


def _parse_envelope(status: int, body: str) -> tuple[int, Any]:
    if status >= 500:
        raise ProviderError("HTTP_5XX", f"HTTP {status}")
    if status == 429:
        raise ProviderError("HTTP_429", "HTTP 429")
    try:
        doc = json.loads(body)
    except ValueError:
        text = body.strip()
        # Some errors come back in plain text even with json=1.
        if text.startswith(("ERROR_", "IP_BANNED", "MAX_USER_TURN")) and text.isprintable():
            raise ProviderError(text.split("|", 1)[0][:64]) from None
        raise ProviderError("UNPARSEABLE", f"HTTP {status}, {len(body)} bytes") from None
    if not isinstance(doc, dict) or "status" not in doc or "request" not in doc:
        raise ProviderError("UNPARSEABLE", f"HTTP {status}, unexpected JSON shape")
    if status >= 400:
        raise ProviderError(f"HTTP_{status}")
    try:
        return int(doc["status"]), doc["request"]
    except (TypeError, ValueError):
        raise ProviderError("UNPARSEABLE", "status is not a number") from None


def _one_result(item: Any) -> TaskResult:
    if isinstance(item, dict):  # {"status": 1, "request": "token"} per id
        if "request" not in item:
            return TaskResult(ready=True, error="UNPARSEABLE")
        if str(item.get("status")) == "1":
            return TaskResult(ready=True, token=str(item["request"]))
        item = item["request"]
    text = str(item).strip()
    if text == NOT_READY:
        return _PENDING
    if text.startswith("ERROR_") or text in ("IP_BANNED",):
        return TaskResult(ready=True, error=text)
    if text.startswith("OK|"):
        text = text[3:]
    return TaskResult(ready=True, token=text)


def parse_bulk(ids: Sequence[str], status: int, request: Any) -> dict[str, TaskResult]:
    """Map each id to its result from a ``res.php?action=get&ids=…&json=1`` answer.

    Accepted forms: ``{"status":1,"request":"a|CAPCHA_NOT_READY|c"}`` (the 2captcha bulk answer:
    the plain-text list inside the JSON envelope), ``request`` as a list, or as an object keyed
    by id. ``{"status":0,"request":"CAPCHA_NOT_READY"}`` means none is ready; any other status-0
    answer is an error for the whole call (raised).
    """
    if isinstance(request, dict):
        return {i: _one_result(request[i]) if i in request else _PENDING for i in ids}
    if isinstance(request, list):
        items: list[Any] = request
    else:
        text = str(request)
        if status != 1 and text == NOT_READY:
            return {i: _PENDING for i in ids}
        if status != 1 and "|" not in text:
            code = text[:64] if text else "UNPARSEABLE"
            if len(ids) == 1 and classify(code)[0] is ErrorKind.FATAL:
                return {ids[0]: TaskResult(ready=True, error=code)}  # this task's own error
            raise ProviderError(code)
        items = text.split("|") if len(ids) > 1 else [text]
    if len(items) != len(ids):
        raise ProviderError("UNPARSEABLE", f"{len(items)} answers for {len(ids)} ids")
    return {i: _one_result(item) for i, item in zip(ids, items, strict=True)}


class ProviderClient:
    """Single HTTP calls to in.php / res.php over one shared aiohttp session."""

    def __init__(self, cfg: ProviderConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._in_url = f"{cfg.url}/in.php"
        self._res_url = f"{cfg.url}/res.php"

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._cfg.max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._cfg.request_timeout),
                trust_env=False,
                headers={"User-Agent": "captcha-solver/0.1"},
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, endpoint: str, url: str, form: Mapping[str, str]) -> tuple[int, Any]:
        if self._session is None:
            await self.start()
        assert self._session is not None
        self._metrics.inc("provider_requests_total", endpoint=endpoint)
        try:
            async with self._session.post(url, data=dict(form)) as response:
                body = await response.text()
                status = response.status
        except TimeoutError:
            raise ProviderError(
                "TIMEOUT", f"{endpoint} took over {self._cfg.request_timeout}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise ProviderError("NETWORK", f"{endpoint}: {type(exc).__name__}") from None
        return _parse_envelope(status, body)

    async def submit(self, key: Secret, method: str, params: Mapping[str, str]) -> str:
        """POST in.php; the provider's task id, or :class:`ProviderError`."""
        form = {**params, "method": method, "key": key.reveal(), "json": "1"}
        status, request = await self._post("in", self._in_url, form)
        text = str(request)
        if status != 1:
            raise ProviderError(text[:64] if text else "UNPARSEABLE")
        if not text or len(text) > 64 or not text.isprintable():
            raise ProviderError("UNPARSEABLE", "bad task id")
        return text

    async def results(self, key: Secret, ids: Sequence[str]) -> dict[str, TaskResult]:
        """One ``res.php action=get`` call for all *ids* (bulk ``ids=a,b,c``)."""
        form = {"key": key.reveal(), "action": "get", "json": "1"}
        if len(ids) == 1:
            form["id"] = ids[0]
        else:
            form["ids"] = ",".join(ids)
        status, request = await self._post("res", self._res_url, form)
        return parse_bulk(ids, status, request)

    async def balance(self, key: Secret) -> float:
        status, request = await self._post(
            "res", self._res_url, {"key": key.reveal(), "action": "getbalance", "json": "1"}
        )
        if status != 1:
            raise ProviderError(str(request)[:64])
        try:
            return float(request)
        except (TypeError, ValueError):
            raise ProviderError("UNPARSEABLE", "balance is not a number") from None


async def check_balance(cfg: ProviderConfig, metrics: Metrics, key: Secret) -> float:
    """One ``getbalance`` call on a session of its own: the worker's check that the provider
    accepts the key of a version it just picked up (see :class:`~.keycache.KeyCache`). The
    balance, or :class:`ProviderError` (``kind`` KEY_PROBLEM: the provider refuses the key)."""
    client = ProviderClient(cfg, metrics)
    try:
        return await client.balance(key)
    finally:
        await client.close()
