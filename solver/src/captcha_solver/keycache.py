"""The CaptchaAI key, held in memory only, refreshed from Vault.

* Refresh every ``refresh_interval`` ± ``refresh_jitter`` (a fraction), at once on
  :meth:`KeyCache.request_refresh` (SIGHUP), and at once when the provider rejects the key.
* Rejected key and Vault still holds it → the circuit opens: no provider calls for
  ``circuit_cooldown`` seconds (repeated bad-key calls get the host banned); a new key from
  Vault closes it at once.
* Vault unreachable → keep serving the cached key until it is ``max_staleness`` seconds past
  its last confirmation, then fail closed. Failed reads are retried on a growing backoff, except
  for ``nudge_retry_window`` seconds after a SIGHUP (a rotation waits): then every
  ``retry_delay`` (±50 %), between the rounds over the addresses too (bench/leader_failover.py).
* ``backup_keys`` in the secret: on ERROR_ZERO_BALANCE and similar the next key is used; the
  exhausted one is tried again after ``zero_balance_cooldown``.
* The provider's word on each version: while the refresh loop runs, every version the worker
  picks up is checked once with ``getbalance`` (a task the provider takes with the key counts
  too). ``/healthz`` reports ``provider_accepted_version`` (the last version whose main key the
  provider accepted from this worker) and ``provider_check`` (``version``, ``result`` =
  ``pending|accepted|rejected|error``, ``code``). The key rotation waits for it before it asks
  anyone to revoke the old key. A failed check is retried with the provider backoff; a rejected
  key again after ``circuit_cooldown`` or at once on SIGHUP. The check only reports: the circuit
  and the key choice stay with the solves.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .config import ProviderConfig, VaultConfig
from .contract import ROTATION_RECORD_FIELDS
from .metrics import Metrics
from .provider import ErrorKind, ProviderError, check_balance
from .secret import Secret
from .vault import (
    KvSecret,
    SecretNotFound,
    VaultAuthError,
    VaultError,
    VaultLoginHeldBack,
    VaultUnavailable,
    WrappingTokenError,
)

log = logging.getLogger(__name__)

ROTATION_FIELDS = ROTATION_RECORD_FIELDS  # the record key_rotation_state writes (contract.py)


class VaultReader(Protocol):
    def read_kv(self, mount: str, path: str, *, prompt: bool = False) -> KvSecret: ...


class KeyUnavailable(Exception):
    """No key can be used right now; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class KeySet:
    keys: tuple[Secret, ...]  # api_key first, then backup_keys
    version: int
    custom_metadata: Mapping[str, str]
    created_time: str


def _keyset_from(secret: KvSecret) -> KeySet:
    primary = secret.data.get("api_key")
    if not isinstance(primary, str) or not primary.strip():
        raise VaultError("the secret has no non-empty 'api_key' field")
    keys = [Secret(primary.strip())]
    backups: Any = secret.data.get("backup_keys") or []
    if isinstance(backups, str):  # tolerate a comma-separated string
        backups = backups.split(",")
    if not isinstance(backups, list):
        raise VaultError("'backup_keys' in the secret must be a list of strings")
    for item in backups:
        if isinstance(item, str) and item.strip():
            candidate = Secret(item.strip())
            if candidate not in keys:
                keys.append(candidate)
    return KeySet(tuple(keys), secret.version, secret.custom_metadata, secret.created_time)


def _parse_time(text: str) -> float | None:
    if not text:
        return None
    try:
        # Vault: 2026-11-22T02:44:54.123456789Z (nanoseconds: trim to micro)
        base, _, frac = text.rstrip("Z").partition(".")
        stamp = dt.datetime.fromisoformat(base).replace(tzinfo=dt.UTC)
        return stamp.timestamp() + (float("0." + frac[:6]) if frac else 0.0)
    except ValueError:
        return None


BalanceCheck = Callable[[Secret], Awaitable[float]]


class KeyCache:
    """Memory-only key cache with refresh loop, staleness bound and circuit breaker."""

    def __init__(
        self,
        vault_cfg: VaultConfig,
        provider_cfg: ProviderConfig,
        vault: VaultReader,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_fatal: Callable[[Exception], None] | None = None,
        balance_check: BalanceCheck | None = None,
    ) -> None:
        self._cfg = vault_cfg
        self._pcfg = provider_cfg
        self._vault = vault
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._on_fatal = on_fatal
        self._keyset: KeySet | None = None
        self._loaded_at_wall = 0.0  # when the current version was first loaded
        self._last_success = 0.0  # monotonic time of the last good Vault read
        self._last_success_wall: float | None = None
        self._vault_reachable = False
        self._last_error: str | None = None
        self._failures = 0
        self._rejected: set[Secret] = set()
        self._exhausted: dict[Secret, float] = {}
        self._circuit_until: float | None = None  # set: open, or half-open once it is past
        self._probe_started: float | None = None
        self._probe_key: Secret | None = None
        self._banned_until: float | None = None
        self._wake = asyncio.Event()
        self._wake_reason = "interval"
        self._inflight_refresh: asyncio.Task[bool] | None = None
        self._refresh_seq = 0  # reads started so far; _inflight_seq: the number of the last one
        self._inflight_seq = 0
        self._loop_task: asyncio.Task[None] | None = None
        # The provider's word on the versions (getbalance at pick-up, or an accepted submit).
        self._balance: BalanceCheck = balance_check or (
            lambda key: check_balance(provider_cfg, metrics, key)
        )
        self._accepted_version: int | None = None
        self._check: dict[str, Any] | None = None  # version, result, code
        self._check_task: asyncio.Task[None] | None = None
        self._check_version: int | None = None  # the version _check_task checks
        self._nudges = 0  # SIGHUPs so far; _check_nudges: the count when the last attempt began
        self._nudged_at: float | None = None  # monotonic time of a SIGHUP no read has answered yet
        self._check_nudges = 0

    # ------------------------------------------------------------------ refresh
    async def refresh(self, reason: str, *, fresh: bool = False) -> bool:
        """Read the key from Vault now; concurrent callers share one read.

        ``fresh``: only a read that starts after this call will do. A refusal by the provider
        asks what Vault holds *now*: a read already on the wire may carry the answer from
        before an operator put the new key, and would open the circuit on a stale answer.
        """
        called = self._refresh_seq
        task = self._inflight_refresh
        while fresh and task is not None and not task.done() and self._inflight_seq <= called:
            await asyncio.shield(task)  # let the older read land, then read again
            task = self._inflight_refresh
        if task is None or task.done():
            self._refresh_seq += 1
            self._inflight_seq = self._refresh_seq
            task = asyncio.ensure_future(self._do_refresh(reason))
            self._inflight_refresh = task
        return await asyncio.shield(task)

    async def _do_refresh(self, reason: str) -> bool:
        try:
            secret = await asyncio.to_thread(
                functools.partial(self._vault.read_kv, prompt=self._nudged_recently()),
                self._cfg.kv_mount,
                self._cfg.key_path,
            )
            keyset = _keyset_from(secret)
        except WrappingTokenError as exc:
            self._last_error = str(exc)
            self._metrics.inc("vault_errors_total", kind="wrapping")
            log.critical("secret-id unwrap refused: %s", exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)
            return False
        except VaultError as exc:
            kind = (
                "unavailable"
                if isinstance(exc, VaultUnavailable)
                else "login_held_back"
                if isinstance(exc, VaultLoginHeldBack)
                else "auth"
                if isinstance(exc, VaultAuthError)
                else "not_found"
                if isinstance(exc, SecretNotFound)
                else "error"
            )
            self._failures += 1
            self._vault_reachable = not isinstance(exc, VaultUnavailable)
            self._last_error = f"vault {kind}: {exc}"
            self._metrics.inc("vault_errors_total", kind=kind)
            self._metrics.inc("key_refreshes_total", reason=reason, result="error")
            log.warning(
                "key refresh failed",
                extra={"reason": reason, "error": str(exc), "stale_seconds": self.stale_seconds()},
            )
            return False
        except Exception as exc:  # never let the refresh loop die on a surprise
            self._failures += 1
            self._last_error = f"vault error: {type(exc).__name__}"
            self._metrics.inc("vault_errors_total", kind="unexpected")
            self._metrics.inc("key_refreshes_total", reason=reason, result="error")
            log.exception("key refresh failed unexpectedly", extra={"reason": reason})
            return False
        self._install(keyset, reason)
        return True

    def _install(self, keyset: KeySet, reason: str) -> None:
        old = self._keyset
        now = self._clock()
        self._failures = 0
        self._nudged_at = None
        self._vault_reachable = True
        self._last_success = now
        self._last_success_wall = self._wall()
        self._last_error = None
        self._keyset = keyset
        self._metrics.inc("key_refreshes_total", reason=reason, result="ok")
        if old is None or old.keys[0] != keyset.keys[0] or old.version != keyset.version:
            if self._accepted_version != keyset.version:
                self._check = {"version": keyset.version, "result": "pending", "code": None}
            self._start_check()
        if old is None or old.keys != keyset.keys or old.version != keyset.version:
            self._loaded_at_wall = self._wall()
            log.info(
                "key loaded",
                extra={
                    "reason": reason,
                    "key_version": keyset.version,
                    "key_fingerprint": keyset.keys[0].fingerprint,
                    "backup_keys": len(keyset.keys) - 1,
                },
            )
        # Forget marks on keys that are no longer in the secret.
        current = set(keyset.keys)
        self._rejected &= current
        self._exhausted = {k: v for k, v in self._exhausted.items() if k in current}
        if self._circuit_until is not None and self._usable_key(now) is not None:
            log.info("circuit closed: Vault returned a key the provider has not rejected")
            self._close_circuit()

    def request_refresh(self, reason: str = "sighup") -> None:
        """Ask the refresh loop to read the key now (signal-handler safe)."""
        self._wake_reason = reason
        if reason == "sighup":
            self._nudges += 1
            self._nudged_at = self._clock()
        self._wake.set()

    def _next_delay(self) -> float:
        interval = self._cfg.refresh_interval
        if self._failures and self._nudged_recently():
            # A rotation nudged this worker and waits for it, and Vault did not answer (a raft
            # leader election, say: seconds). Retry on a short steady cadence, not the growing
            # backoff whose 2 s and 4 s gaps would keep the worker behind a new leader. Only a
            # nudged worker does this, for nudge_retry_window seconds, so a long outage still
            # sees the backoff from every worker.
            delay = self._cfg.retry_delay * random.uniform(0.5, 1.5)  # noqa: S311 (not crypto)
            return min(interval, delay)
        if self._failures:
            interval = min(interval, self._cfg.retry_delay * 2 ** min(self._failures, 6) + 0.05)
        jitter = self._cfg.refresh_jitter
        return interval * random.uniform(1 - jitter, 1 + jitter)  # noqa: S311 (not crypto)

    def _nudged_recently(self) -> bool:
        return (
            self._nudged_at is not None
            and self._clock() - self._nudged_at < self._cfg.nudge_retry_window
        )

    async def run(self, *, read_first: bool = True) -> None:
        """The refresh loop (runs until cancelled). Reads at once unless told otherwise."""
        reason = "startup"
        while True:
            if read_first:
                await self.refresh(reason)
                if reason == "sighup":  # a nudge: ask the provider again unless it said yes
                    self._start_check(retry_now=True)
            read_first = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_delay())
            if self._wake.is_set():
                self._wake.clear()
                reason = self._wake_reason
                self._wake_reason = "interval"
            else:
                reason = "interval"

    def start(self, *, read_first: bool = True) -> asyncio.Task[None]:
        self._loop_task = asyncio.create_task(self.run(read_first=read_first), name="key-refresh")
        self._start_check()
        return self._loop_task

    async def stop(self) -> None:
        for task in (self._loop_task, self._check_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # ------------------------------------------------------------------ the provider's word
    def _start_check(self, *, retry_now: bool = False) -> None:
        """Check the current version's main key at the provider (only while the refresh loop
        runs), unless the provider already accepted it or a check of it is under way.
        ``retry_now``: a check waiting for its next attempt (after a refusal or an error)
        asks again now."""
        keyset = self._keyset
        if self._loop_task is None or self._loop_task.done() or keyset is None:
            return
        if self._accepted_version == keyset.version:
            return
        task = self._check_task
        if task is not None and not task.done():
            # Waiting after an answer that came before the latest nudge: ask again now.
            waiting = self._check is not None and self._check.get("result") != "pending"
            stale = waiting and self._check_nudges < self._nudges
            if self._check_version == keyset.version and not (retry_now and stale):
                return
            task.cancel()
        self._check_version = keyset.version
        self._check_task = asyncio.ensure_future(self._check_loop(keyset))

    async def _check_loop(self, keyset: KeySet) -> None:
        key, version = keyset.keys[0], keyset.version
        attempt = 0
        while True:
            self._check_nudges = self._nudges
            try:
                balance = await self._balance(key)
            except asyncio.CancelledError:
                raise
            except ProviderError as exc:
                if exc.kind is ErrorKind.KEY_PROBLEM:
                    result, wait = "rejected", self._pcfg.circuit_cooldown
                    log.error(
                        "the provider refuses the key of the version in Vault",
                        extra={
                            "key_version": version,
                            "code": exc.code,
                            "key_fingerprint": key.fingerprint,
                        },
                    )
                else:
                    result = "error"
                    wait = min(self._pcfg.backoff_max, self._pcfg.backoff_base * 2**attempt)
                    log.info(
                        "provider check of the key failed; retrying",
                        extra={"key_version": version, "code": exc.code, "retry_in": wait},
                    )
                code = exc.code
            except Exception as exc:  # never let a surprise end the checks silently
                result, code = "error", type(exc).__name__
                wait = min(self._pcfg.backoff_max, self._pcfg.backoff_base * 2**attempt)
                log.info("provider check of the key failed unexpectedly", exc_info=True)
            else:
                log.info(
                    "the provider accepts the key",
                    extra={"key_version": version, "balance": balance},
                )
                self._mark_accepted(version, key)
                return
            if self._keyset is None or self._keyset.version != version:
                return  # a newer version has its own check
            self._check = {"version": version, "result": result, "code": code}
            attempt += 1
            await asyncio.sleep(wait)

    def _mark_accepted(self, version: int, key: Secret) -> None:
        """The provider accepted *key*: the current version counts as accepted if it is the
        main key of that version."""
        keyset = self._keyset
        if keyset is None or keyset.version != version or keyset.keys[0] != key:
            return
        self._accepted_version = version
        self._check = {"version": version, "result": "accepted", "code": None}

    # ------------------------------------------------------------------ key selection
    def _usable_key(self, now: float) -> Secret | None:
        if self._keyset is None:
            return None
        for key in self._keyset.keys:
            if key in self._rejected:
                continue
            until = self._exhausted.get(key)
            if until is not None and now < until:
                continue
            return key
        return None

    def stale_seconds(self) -> float:
        # Any failed read counts (unreachable, login refused, secret gone): a revoked
        # secret-id must not let the cached key live on forever.
        if self._keyset is None or not self._failures:
            return 0.0
        return max(0.0, self._clock() - self._last_success)

    def current_key(self, *, probe: bool = True) -> Secret:
        """The key to use now, or :class:`KeyUnavailable` (fail closed).

        After the circuit's cool-down it is half-open: exactly one caller gets the rejected key
        as a probe (``probe=False`` callers, e.g. health checks, never take it); the others
        wait until :meth:`report_accepted` closes the circuit or a rejection re-opens it.
        """
        now = self._clock()
        if self._banned_until is not None:
            if now < self._banned_until:
                raise KeyUnavailable("ip_banned", "the provider banned this host; waiting")
            self._banned_until = None
        if self._keyset is None:
            raise KeyUnavailable("no_key", self._last_error or "no key loaded from Vault yet")
        if self.stale_seconds() > self._cfg.max_staleness:
            raise KeyUnavailable(
                "stale",
                f"Vault unreachable and the cached key is older than max_staleness"
                f" ({self._cfg.max_staleness:g}s)",
            )
        if self._circuit_until is not None:
            if now < self._circuit_until:
                raise KeyUnavailable(
                    "circuit_open",
                    "the provider rejected the key and Vault still holds it; circuit open",
                )
            probing = self._probe_started is not None and now - self._probe_started < (
                self._pcfg.request_timeout * 2
            )
            if probing or not probe:
                raise KeyUnavailable(
                    "circuit_open", "circuit half-open: one request is probing the key"
                )
            self._probe_started = now
            self._probe_key = self._keyset.keys[0]
            log.info("circuit half-open: one probe request with the key")
            return self._probe_key
        key = self._usable_key(now)
        if key is None:
            if self._rejected:  # the provider said no; a refresh is deciding what next
                raise KeyUnavailable("key_rejected", "the provider rejected the key")
            raise KeyUnavailable("keys_exhausted", "every key in the secret is out of balance")
        return key

    def report_accepted(self, key: Secret) -> None:
        """The provider accepted *key* (a task was submitted): a probe closes the circuit; the
        main key of the current version counts as the provider's word on that version."""
        keyset = self._keyset
        if (
            keyset is not None
            and key == keyset.keys[0]
            and self._accepted_version != keyset.version
        ):
            self._mark_accepted(keyset.version, key)
            task = self._check_task
            if task is not None and not task.done():
                task.cancel()
        if self._probe_key is not None and key == self._probe_key:
            log.info("circuit closed: the provider accepts the key again")
            self._rejected.discard(key)
            self._close_circuit()

    def _close_circuit(self) -> None:
        self._circuit_until = None
        self._probe_started = None
        self._probe_key = None

    # ------------------------------------------------------------------ provider feedback
    async def report_rejected(self, key: Secret, code: str) -> Secret | None:
        """The provider says *key* is invalid: refresh now; a usable key or None (circuit open)."""
        if key not in self._rejected:
            self._rejected.add(key)
            log.warning(
                "provider rejected the key, refreshing from Vault",
                extra={"code": code, "key_fingerprint": key.fingerprint},
            )
        await self.refresh("key_rejected", fresh=True)
        now = self._clock()
        usable = self._usable_key(now)
        if (
            usable is None
            and self._keyset is not None
            and any(k in self._rejected for k in self._keyset.keys)
        ):
            if self._circuit_until is None or now >= self._circuit_until:
                self._close_circuit()
                self._circuit_until = now + self._pcfg.circuit_cooldown
                self._last_error = f"provider rejected the key ({code}); Vault still holds it"
                log.error(
                    "circuit open: Vault still holds the rejected key",
                    extra={"code": code, "cooldown": self._pcfg.circuit_cooldown},
                )
            return None
        if usable is None:
            return None
        try:
            return self.current_key()
        except KeyUnavailable:
            return None

    def report_exhausted(self, key: Secret, code: str) -> Secret | None:
        """Zero balance (or similar) on *key*: switch to the next key, if any."""
        now = self._clock()
        if key not in self._exhausted or self._exhausted[key] <= now:
            self._exhausted[key] = now + self._pcfg.zero_balance_cooldown
            log.warning(
                "key out of balance, switching to the next key",
                extra={"code": code, "key_fingerprint": key.fingerprint},
            )
            self.request_refresh("key_exhausted")
        try:
            return self.current_key()
        except KeyUnavailable:
            return None

    def report_banned(self, code: str) -> None:
        """The provider banned this host: stop calling it for the circuit cool-down."""
        self._banned_until = self._clock() + self._pcfg.circuit_cooldown
        self._last_error = f"provider refused this host ({code})"
        log.error("provider banned this host; pausing", extra={"code": code})

    # ------------------------------------------------------------------ health
    @property
    def circuit_open(self) -> bool:
        """Open or half-open (until a probe succeeds), or paused after a ban."""
        banned = self._banned_until is not None and self._clock() < self._banned_until
        return self._circuit_until is not None or banned

    @property
    def key_version(self) -> int | None:
        return self._keyset.version if self._keyset else None

    @property
    def vault_reachable(self) -> bool:
        return self._vault_reachable

    @property
    def last_error(self) -> str | None:
        """Why the last Vault read failed (None after a successful one)."""
        return self._last_error

    def key_age_seconds(self) -> float | None:
        """Seconds since the current key version was written to Vault (or first loaded)."""
        if self._keyset is None:
            return None
        created = _parse_time(self._keyset.created_time) or self._loaded_at_wall
        return max(0.0, self._wall() - created)

    def health(self) -> dict[str, Any]:
        """The key-related part of ``/healthz`` (see docs/interfaces.md)."""
        error: str | None = None
        try:
            key: Secret | None = self.current_key(probe=False)
        except KeyUnavailable as exc:
            key, error = None, str(exc)
        if key is None:
            status = "unhealthy"
        elif self._failures or (self._keyset is not None and key != self._keyset.keys[0]):
            status = "degraded"
            error = self._last_error or "using a backup key"
        else:
            status = "ok"
        keyset = self._keyset
        shown = key or (keyset.keys[0] if keyset else None)
        age = self.key_age_seconds()
        return {
            "status": status,
            "key_version": keyset.version if keyset else None,
            "key_fingerprint": shown.fingerprint if shown else None,
            "key_age_seconds": round(age, 3) if age is not None else None,
            "last_refresh": (
                dt.datetime.fromtimestamp(self._last_success_wall, dt.UTC).isoformat()
                if self._last_success_wall is not None
                else None
            ),
            "vault_reachable": self._vault_reachable,
            "vault_stale_seconds": round(self.stale_seconds(), 3),
            "circuit": "open" if self.circuit_open else "closed",
            "provider_accepted_version": self._accepted_version,
            "provider_check": dict(self._check) if self._check else None,
            "rotation": {
                k: v
                for k, v in (keyset.custom_metadata if keyset else {}).items()
                if k in ROTATION_FIELDS
            },
            "error": error,
        }
