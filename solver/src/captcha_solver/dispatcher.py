"""Runs solve tasks: submit with backoff, first-poll delay, one bulk poll per tick.

Each :meth:`Dispatcher.solve` call submits its task and then waits on a future. A single
poller coroutine wakes at most once per ``poll_interval``, collects every task whose first-poll
delay has passed, and asks ``res.php`` about all of them in ONE bulk call per key (normally
one key, so one call per tick). That keeps hundreds of tasks in flight cheap: a task costs a
small object and a future, not a coroutine polling on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import ProviderConfig
from .keycache import KeyCache, KeyUnavailable
from .metrics import Metrics
from .provider import ErrorKind, KeyProblem, ProviderClient, ProviderError
from .secret import Secret

log = logging.getLogger(__name__)

UNSOLVABLE = "ERROR_CAPTCHA_UNSOLVABLE"
_MAX_KEY_SWITCHES = 3
# The solve-duration histogram is labelled by method, a name the caller sends: past this many
# distinct names, further ones are counted as "other" (a bounded number of series).
MAX_METHOD_LABELS = 32


class SolveError(Exception):
    """A solve that failed; ``kind`` drives the HTTP status, ``code`` is for humans/metrics."""

    def __init__(self, code: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind

    @property
    def outcome(self) -> str:
        return "unsolvable" if self.code == UNSOLVABLE else self.kind


@dataclass(frozen=True, slots=True)
class SolveResult:
    token: str
    task_id: str
    elapsed: float
    key_version: int | None


class _Pending:
    __slots__ = ("future", "key", "next_poll", "task_id")

    def __init__(
        self, task_id: str, key: Secret, future: asyncio.Future[str], next_poll: float
    ) -> None:
        self.task_id = task_id
        self.key = key
        self.future = future
        self.next_poll = next_poll


class Dispatcher:
    """Submits tasks and polls their results in bulk."""

    def __init__(
        self,
        cfg: ProviderConfig,
        provider: ProviderClient,
        keys: KeyCache,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._provider = provider
        self._keys = keys
        self._metrics = metrics
        self._clock = clock
        self._pending: dict[str, _Pending] = {}
        self._wakeup = asyncio.Event()
        self._last_poll = float("-inf")
        self._poller: asyncio.Task[None] | None = None
        self._submit_gate = asyncio.Semaphore(cfg.max_submits_in_flight)
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._method_labels: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_loop(), name="bulk-poller")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    # ------------------------------------------------------------------ solving
    def _method_label(self, method: str) -> str:
        if method in self._method_labels:
            return method
        if len(self._method_labels) >= MAX_METHOD_LABELS:
            return "other"
        self._method_labels.add(method)
        return method

    def _finished(self, method: str, outcome: str, seconds: float) -> None:
        """Count a finished solve and observe its wall time (by method and outcome)."""
        self._metrics.inc("solves_total", outcome=outcome)
        self._metrics.observe(
            "solve_duration_seconds",
            max(0.0, seconds),
            method=self._method_label(method),
            outcome=outcome,
        )

    async def solve(self, method: str, params: Mapping[str, str]) -> SolveResult:
        if self.in_flight >= self._cfg.max_in_flight:
            self._finished(method, "busy", 0.0)
            raise SolveError("BUSY", "busy", f"{self.in_flight} tasks in flight (the maximum)")
        start = self._clock()
        self.in_flight += 1
        self._idle.clear()
        outcome = "error"
        try:
            result = await self._solve(method, params, start)
            outcome = "solved"
            return result
        except SolveError as exc:
            outcome = exc.outcome
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            self._finished(method, outcome, self._clock() - start)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._cfg.backoff_max, self._cfg.backoff_base * 2.0**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter, not crypto)

    async def _solve(self, method: str, params: Mapping[str, str], start: float) -> SolveResult:
        deadline = start + self._cfg.task_timeout
        attempt = 0
        key_switches = 0
        last_code = "TIMEOUT"
        while True:
            if self._clock() >= deadline:
                raise SolveError(
                    "TIMEOUT",
                    "timeout",
                    f"no result within {self._cfg.task_timeout:g}s (last: {last_code})",
                )
            try:
                async with self._submit_gate:
                    # The key is taken only now: a submit that waited here while another one
                    # was refused finds the circuit open and never reaches the provider.
                    try:
                        key = self._keys.current_key()
                    except KeyUnavailable as exc:
                        raise SolveError(exc.reason.upper(), "unavailable", str(exc)) from None
                    task_id = await self._provider.submit(key, method, params)
                self._keys.report_accepted(key)
                token = await self._await_result(task_id, key, method, deadline)
            except ProviderError as exc:
                last_code = exc.code
                self._metrics.inc("provider_errors_total", code=exc.code)
                if exc.kind is ErrorKind.RETRYABLE:
                    delay = self._backoff(attempt)
                    attempt += 1
                    if self._clock() + delay >= deadline:
                        raise SolveError(exc.code, "timeout", f"gave up retrying: {exc}") from None
                    await asyncio.sleep(delay)
                    continue
                if exc.kind is ErrorKind.FATAL:
                    raise SolveError(exc.code, "fatal", str(exc)) from None
                # A key problem: refresh / switch keys, then resubmit with the new key.
                key_switches += 1
                try:  # the refresh behind it may be slow (Vault down): stay within the deadline
                    async with asyncio.timeout(max(0.0, deadline - self._clock())):
                        replacement = await self._on_key_problem(exc, key)
                except TimeoutError:
                    replacement = None
                if replacement is None or key_switches > _MAX_KEY_SWITCHES:
                    raise SolveError(exc.code, "key_problem", str(exc)) from None
                continue
            return SolveResult(token, task_id, self._clock() - start, self._keys.key_version)

    async def _on_key_problem(self, exc: ProviderError, key: Secret) -> Secret | None:
        if exc.key_problem is KeyProblem.REJECTED:
            return await self._keys.report_rejected(key, exc.code)
        if exc.key_problem is KeyProblem.EXHAUSTED:
            return self._keys.report_exhausted(key, exc.code)
        self._keys.report_banned(exc.code)
        return None

    async def _await_result(self, task_id: str, key: Secret, method: str, deadline: float) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        first_poll = self._clock() + self._cfg.first_poll_delay_for(method)
        self._pending[task_id] = _Pending(task_id, key, future, first_poll)
        self._wakeup.set()
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                return await future
        except TimeoutError:
            raise SolveError(
                "TIMEOUT", "timeout", f"task not ready within {self._cfg.task_timeout:g}s"
            ) from None
        finally:
            self._pending.pop(task_id, None)

    async def wait_idle(self, grace: float) -> bool:
        """Wait until no task is in flight (True) or *grace* seconds pass (False)."""
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ polling
    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _poll_loop(self) -> None:
        """One bulk ``res.php`` call per key per tick, for every task due at that tick.

        Each task is polled every ``poll_interval`` (its first poll after the per-method delay);
        the tick (``poll_tick``, a fraction of the interval) only sets how finely those moments
        are grouped: a task is polled at the tick nearest its due time, never a whole interval
        late, while the provider sees at most one ``res.php`` call per tick.
        """
        tick = self._cfg.effective_poll_tick
        half = tick / 2
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            now = self._clock()
            earliest = min(p.next_poll for p in self._pending.values())
            wait = max(earliest - half, self._last_poll + tick) - now
            if wait > 0:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                continue
            self._last_poll = now
            groups: defaultdict[Secret, list[_Pending]] = defaultdict(list)
            for pending in self._pending.values():
                if pending.next_poll - half <= now and not pending.future.done():
                    groups[pending.key].append(pending)
            try:
                await asyncio.gather(*(self._poll_group(k, g, now) for k, g in groups.items()))
            except Exception:  # never let the poller die; tasks time out on their own
                log.exception("bulk poll failed")

    async def _poll_group(self, key: Secret, group: list[_Pending], tick_start: float) -> None:
        ids = [p.task_id for p in group]
        try:
            results = await self._provider.results(key, ids)
        except ProviderError as exc:
            if exc.kind is ErrorKind.KEY_PROBLEM:
                # Every task of this key, not only the ones due now: polling the others on the
                # next ticks would send the provider more bad-key requests (and get us banned).
                # Each solve() then decides: refresh the key and resubmit, or fail.
                for p in list(self._pending.values()):
                    if p.key == key and not p.future.done():
                        p.future.set_exception(ProviderError(exc.code, "while polling"))
                return
            self._metrics.inc("provider_errors_total", code=exc.code)
            log.warning("bulk poll failed, retrying after poll_interval", extra={"code": exc.code})
            for p in group:
                p.next_poll = tick_start + self._cfg.poll_interval
            return
        # From the tick's start, not the answer's arrival: else the next tick is a hair too
        # early for these tasks and they would wait a whole extra tick.
        next_poll = tick_start + self._cfg.poll_interval
        for p in group:
            result = results.get(p.task_id)
            if p.future.done():
                continue
            if result is None or not result.ready:
                p.next_poll = next_poll
            elif result.error is not None:
                p.future.set_exception(ProviderError(result.error))
            else:
                p.future.set_result(result.token or "")
