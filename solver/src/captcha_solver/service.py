"""The local HTTP API: ``POST /solve``, ``GET /healthz``, ``GET /metrics`` (loopback only).

SIGHUP reads the key from Vault now (and ``server.token_file`` again). SIGTERM (or SIGINT)
stops accepting solves (503), lets the tasks in flight finish for up to
``server.shutdown_grace`` seconds, then exits.

The secret-id's expiry is watched too: ``/healthz`` and ``/metrics`` show it, and within
``vault.secret_id_warn_before`` of it ``/healthz`` lists a warning and the journal gets one
WARNING an hour (:class:`SecretIdWatch`); the status stays ``ok`` while the secret-id is valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from aiohttp import web

from .config import Config, ConfigError, VaultConfig
from .dispatcher import Dispatcher, SolveError
from .keycache import KeyCache
from .metrics import Labels, Metrics, new_metrics
from .provider import ProviderClient
from .sdnotify import notify
from .secret import REGISTRY, Secret
from .vault import KvSecret, SecretIdExpiry, VaultClient, VaultError, WrappingTokenError

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
_METHOD_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# Form fields the worker sets itself; a caller must not send them.
_RESERVED = frozenset({"key", "json", "action", "id", "ids", "method"})
_STATUS_FOR_KIND = {
    "fatal": 422,
    "busy": 429,
    "unavailable": 503,
    "key_problem": 503,
    "timeout": 504,
}


def _json(data: Any, status: int = 200) -> web.Response:
    text = REGISTRY.mask(json.dumps(data, ensure_ascii=False))
    return web.Response(text=text, status=status, content_type="application/json")


def _error(
    code: str, kind: str, message: str, status: int, retry_after: int | None = None
) -> web.Response:
    response = _json(
        {"status": "error", "error": {"code": code, "kind": kind, "message": message}}, status
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _bearer_matches(header: str, token: Secret) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>`` (constant-time compare)."""
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.reveal().encode("utf-8")
    )


def _unauthorized() -> web.Response:
    response = _error(
        "UNAUTHORIZED",
        "fatal",
        "this worker requires Authorization: Bearer <token> (the token in its server.token_file)",
        401,
    )
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


# The Host a local client sends: a loopback name or address, with or without a port. A name
# an attacker controls (DNS rebinding to 127.0.0.1) is refused on every route.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_LOOPBACK_HOST_RE = re.compile(r"^(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?$")


@web.middleware
async def _loopback_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    transport = request.transport
    on_unix_socket = transport is not None and isinstance(transport.get_extra_info("sockname"), str)
    if on_unix_socket:  # no browser reaches a unix socket; clients may send any Host there
        return await handler(request)
    if not _LOOPBACK_HOST_RE.match(request.headers.get("Host", "").lower()):
        return _error(
            "NOT_LOOPBACK_HOST",
            "fatal",
            "the worker answers only requests addressed to 127.0.0.1, localhost or [::1]",
            421,
        )
    return await handler(request)


class StartupTimeout(Exception):
    """No key could be read from Vault within ``vault.startup_timeout`` of the start."""


class VaultSession(Protocol):
    """What the service needs from :class:`~captcha_solver.vault.VaultClient`."""

    @property
    def has_token(self) -> bool: ...
    @property
    def secret_id_expiry(self) -> SecretIdExpiry: ...
    def unwrap_secret_id(self) -> bool: ...
    def ensure_token(self) -> None: ...
    def seconds_until_renewal(self) -> float: ...
    def read_kv(self, mount: str, path: str, *, prompt: bool = False) -> KvSecret: ...
    def close(self) -> None: ...


# A secret-id close to its expiry is logged at most this often (the journal is not flooded).
EXPIRY_WARNING_EVERY = 3600.0
# The watch looks again at least this often (a new secret-id, a threshold crossed).
_EXPIRY_CHECK_MAX = 60.0


class SecretIdWatch:
    """Reports when the worker's secret-id expires and warns when that is close.

    ``source`` gives the current :class:`SecretIdExpiry` (the Vault session's); ``wall`` is
    Unix time, ``clock`` a monotonic clock (for the once-an-hour log)."""

    def __init__(
        self,
        cfg: VaultConfig,
        source: Callable[[], SecretIdExpiry],
        *,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._source = source
        self._wall = wall
        self._clock = clock
        self._warned_at: float | None = None
        self._warned_for: tuple[SecretIdExpiry, bool] | None = None  # (secret-id, expired)

    @property
    def expiry(self) -> SecretIdExpiry:
        return self._source()

    def expires_in(self) -> float | None:
        """Seconds until the secret-id expires (0 once expired); None: no expiry, or unknown."""
        left = self._source().remaining(self._wall())
        return None if left is None else max(0.0, left)

    def warning(self) -> str | None:
        """The warning /healthz lists while the secret-id expires within ``warn_before``."""
        expiry = self._source()
        left = expiry.remaining(self._wall())
        if left is None or left >= self._cfg.secret_id_warn_before:
            return None
        if left <= 0:
            return (
                f"secret-id expired at {expiry.text()}: Vault refuses this worker's next AppRole"
                " login; deploy a new one (playbooks/deploy-workers.yml re-issues it)"
            )
        return (
            f"secret-id expires in {left:.0f} s (at {expiry.text()}), within"
            f" vault.secret_id_warn_before ({self._cfg.secret_id_warn_before:g} s): the"
            " scheduled deploy (playbooks/deploy-workers.yml) re-issues it; is it running?"
        )

    def check(self) -> bool:
        """Log the warning as a WARNING, at most once per :data:`EXPIRY_WARNING_EVERY` for one
        secret-id and state (at once for a new secret-id, and when it has expired); True when
        it logged."""
        expiry = self._source()
        message = self.warning()
        if message is None:
            return False
        now = self._clock()
        left = expiry.remaining(self._wall())
        state = (expiry, left is not None and left <= 0)
        if (
            self._warned_for == state
            and self._warned_at is not None
            and now - self._warned_at < EXPIRY_WARNING_EVERY
        ):
            return False
        self._warned_for = state
        self._warned_at = now
        log.warning(
            message,
            extra={
                "secret_id_expires": expiry.text(),
                "secret_id_expires_in_seconds": round(self.expires_in() or 0.0),
                "secret_id_warn_before": self._cfg.secret_id_warn_before,
            },
        )
        return True

    def next_check_in(self) -> float:
        """Seconds until :meth:`check` may have something new to say (1 to 60)."""
        left = self._source().remaining(self._wall())
        wait = _EXPIRY_CHECK_MAX
        if left is not None and left >= self._cfg.secret_id_warn_before:
            wait = min(wait, left - self._cfg.secret_id_warn_before + 0.5)
        return max(1.0, wait)


class Service:
    """Wires config, Vault, key cache, provider client and dispatcher into the HTTP API."""

    def __init__(self, cfg: Config, *, vault: VaultSession | None = None) -> None:
        self.cfg = cfg
        self.metrics: Metrics = new_metrics()
        self.vault: VaultSession = vault or VaultClient(cfg.vault)
        self.keys = KeyCache(
            cfg.vault, cfg.provider, self.vault, self.metrics, on_fatal=self._fatal
        )
        self.fatal: Exception | None = None
        self.provider = ProviderClient(cfg.provider, self.metrics)
        self.dispatcher = Dispatcher(cfg.provider, self.provider, self.keys, self.metrics)
        self.draining = False
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._token_task: asyncio.Task[None] | None = None
        self._startup_task: asyncio.Task[None] | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        # server.token_file's token (None: /solve needs none); read in start(), on SIGHUP again.
        self.api_token: Secret | None = None
        self.secret_id = SecretIdWatch(cfg.vault, lambda: self.vault.secret_id_expiry)
        self._register_gauges()

    # ------------------------------------------------------------------ metrics
    def _register_gauges(self) -> None:
        def one(value: float | None) -> Iterable[tuple[Labels, float]]:
            return [] if value is None else [((), float(value))]

        m = self.metrics
        m.gauge(
            "key_version", "Version of the key in use (KV v2).", lambda: one(self.keys.key_version)
        )
        m.gauge(
            "key_age_seconds",
            "Seconds since the key in use was written to Vault.",
            lambda: one(self.keys.key_age_seconds()),
        )
        m.gauge(
            "tasks_in_flight", "Solve tasks in progress.", lambda: one(self.dispatcher.in_flight)
        )
        m.gauge(
            "vault_reachable",
            "1 when the last Vault read worked.",
            lambda: one(1.0 if self.keys.vault_reachable else 0.0),
        )
        m.gauge(
            "vault_stale_seconds",
            "Seconds the cached key has gone unconfirmed while Vault is unreachable.",
            lambda: one(self.keys.stale_seconds()),
        )
        m.gauge(
            "circuit_open",
            "1 while provider calls are paused (rejected key or banned host).",
            lambda: one(1.0 if self.keys.circuit_open else 0.0),
        )
        m.gauge(
            "secret_id_expires_in_seconds",
            "Seconds until the worker's secret-id expires (+Inf: no expiry; no sample: unknown).",
            lambda: one(
                float("inf") if self.secret_id.expiry.never else self.secret_id.expires_in()
            ),
        )
        m.gauge(
            "healthy",
            "1 when the worker can solve.",
            lambda: one(1.0 if self.health()[1] == 200 else 0.0),
        )

    # ------------------------------------------------------------------ handlers
    def health(self) -> tuple[dict[str, Any], int]:
        key_part = self.keys.health()
        body: dict[str, Any] = {
            "status": key_part["status"],
            "env": self.cfg.env,
            "key_version": key_part["key_version"],
            "key_fingerprint": key_part["key_fingerprint"],
            "key_age_seconds": key_part["key_age_seconds"],
            "last_refresh": key_part["last_refresh"],
            "vault_reachable": key_part["vault_reachable"],
            "vault_stale_seconds": key_part["vault_stale_seconds"],
            "circuit": key_part["circuit"],
            "provider_accepted_version": key_part["provider_accepted_version"],
            "provider_check": key_part["provider_check"],
            "rotation": key_part["rotation"],
            "tasks_in_flight": self.dispatcher.in_flight,
            "error": key_part["error"],
            "secret_id_expires_at": self.secret_id.expiry.text(),
            "secret_id_expires_in_seconds": _rounded(self.secret_id.expires_in()),
            "warnings": [w for w in (self.secret_id.warning(),) if w],
        }
        if self.draining:
            body["status"] = "unhealthy"
            body["error"] = "shutting down"
        return body, 200 if body["status"] in ("ok", "degraded") else 503

    async def handle_healthz(self, request: web.Request) -> web.Response:
        body, status = self.health()
        return _json(body, status)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        text = REGISTRY.mask(self.metrics.render())
        return web.Response(
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Format": "prometheus-text-0.0.4"},
        )

    async def handle_solve(self, request: web.Request) -> web.Response:
        # With server.token_file, only a client that can read the token may solve: any other
        # local process (another user's, a page in a browser) gets 401 before anything else.
        token = self.api_token
        if token is not None and not _bearer_matches(
            request.headers.get("Authorization", ""), token
        ):
            return _unauthorized()
        # JSON only: a page in a scraper's browser can send a "simple" (text/plain) POST
        # without a CORS preflight; it cannot send application/json without one.
        if request.content_type != "application/json":
            return _error(
                "UNSUPPORTED_MEDIA_TYPE", "fatal", "Content-Type must be application/json", 415
            )
        if self.draining:
            # Draining for a restart (a deploy) or a stop: the client retries in a second.
            return _error(
                "SHUTTING_DOWN", "unavailable", "the worker is shutting down", 503, retry_after=1
            )
        try:
            doc = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error("BAD_REQUEST", "fatal", "body must be a JSON object", 400)
        parsed = parse_solve_request(doc)
        if isinstance(parsed, str):
            return _error("BAD_REQUEST", "fatal", parsed, 400)
        method, params = parsed
        try:
            result = await self.dispatcher.solve(method, params)
        except SolveError as exc:
            status = _STATUS_FOR_KIND.get(exc.kind, 502)
            return _error(exc.code, exc.kind, str(exc), status)
        return _json(
            {
                "status": "ok",
                "token": result.token,
                "task_id": result.task_id,
                "elapsed_seconds": round(result.elapsed, 3),
                "key_version": result.key_version,
            }
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_loopback_host_only])
        app.router.add_post("/solve", self.handle_solve)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/metrics", self.handle_metrics)
        return app

    # ------------------------------------------------------------------ lifecycle
    async def _token_keeper(self) -> None:
        """Renew the Vault token before it expires (log in again when renewal fails)."""
        while True:
            if not self.vault.has_token:
                # The refresh loop logs in first; look again soon (not a refresh interval
                # later, or a token shorter than the interval would never be renewed).
                await asyncio.sleep(min(1.0, self.cfg.vault.refresh_interval))
                continue
            wait = self.vault.seconds_until_renewal()
            await asyncio.sleep(min(max(wait, 0.05), self.cfg.vault.refresh_interval))
            try:
                await asyncio.to_thread(self.vault.ensure_token)
            except VaultError as exc:
                self.metrics.inc("vault_errors_total", kind="token")
                log.warning("vault token upkeep failed", extra={"error": str(exc)})
            except Exception:  # keep the keeper alive; the next read logs in again if needed
                self.metrics.inc("vault_errors_total", kind="unexpected")
                log.exception("vault token upkeep failed unexpectedly")

    async def _secret_id_watch(self) -> None:
        """Warn in the journal while the secret-id is close to its expiry (once an hour)."""
        while True:
            wait = _EXPIRY_CHECK_MAX
            try:
                self.secret_id.check()
                wait = self.secret_id.next_check_in()
            except Exception:  # the watch must not die; it only reports
                log.exception("secret-id expiry check failed unexpectedly")
            await asyncio.sleep(wait)

    async def _startup_deadline(self) -> None:
        """Fail closed at start: no key within ``vault.startup_timeout`` seconds -> stop, exit
        75 (the supervisor restarts the worker). Until then /healthz says why; the loop retries."""
        timeout = self.cfg.vault.startup_timeout
        loop = asyncio.get_running_loop()
        deadline = self._started_at + timeout
        while self.keys.key_version is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                reason = self.keys.last_error or "no key loaded from Vault yet"
                log.critical(
                    "no key from Vault within the startup timeout; exiting so that the"
                    " supervisor retries",
                    extra={"startup_timeout": timeout, "error": reason},
                )
                self._fatal(
                    StartupTimeout(f"no key from Vault within {timeout:g}s of start: {reason}")
                )
                return
            await asyncio.sleep(min(0.25, remaining))

    async def start(self) -> None:
        """Unwrap the secret-id (fatal if replayed), start the loops and the HTTP sites."""
        self._started_at = asyncio.get_running_loop().time()
        # Before the unwrap: a bad server.token_file stops the start (CLI: exit 78) with the
        # wrapped secret-id still unused for the next one.
        self.load_api_token()
        try:
            await asyncio.to_thread(self.vault.unwrap_secret_id)
        except WrappingTokenError:
            raise
        except VaultError as exc:  # Vault down at boot: keep going, the refresh loop retries
            self.metrics.inc("vault_errors_total", kind="unwrap")
            log.warning("secret-id unwrap deferred", extra={"error": str(exc)})
        await self.provider.start()
        self.dispatcher.start()
        self._token_task = asyncio.create_task(self._token_keeper(), name="token-keeper")
        self._expiry_task = asyncio.create_task(self._secret_id_watch(), name="secret-id-watch")
        # shutdown() already gave tasks in flight shutdown_grace to finish: the HTTP server
        # must not hold abandoned requests for aiohttp's default 60 s on top of that.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        server = self.cfg.server
        await web.TCPSite(self._runner, server.host, server.port).start()
        if server.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                server.unix_socket.unlink()
            await web.UnixSite(self._runner, str(server.unix_socket)).start()
            os.chmod(server.unix_socket, 0o660)
        # Listening: read the key once (bounded by the Vault timeouts), then report ready. A
        # failed first read is not fatal: /healthz says why and the loop keeps trying.
        await self.keys.refresh("startup")
        self.keys.start(read_first=False)
        if self.cfg.vault.startup_timeout > 0 and self.keys.key_version is None:
            self._startup_task = asyncio.create_task(
                self._startup_deadline(), name="startup-deadline"
            )
        log.info(
            "captcha-solver serving",
            extra={"env": self.cfg.env, "host": server.host, "port": server.port},
        )
        notify("READY=1")

    def load_api_token(self) -> None:
        """Read ``server.token_file`` (at start: a :class:`ConfigError` stops the worker)."""
        self.api_token = self.cfg.server.read_token()
        if self.api_token is not None:
            log.info(
                "POST /solve requires a bearer token",
                extra={"token_file": str(self.cfg.server.token_file)},
            )

    def reload(self) -> None:
        """SIGHUP (``systemctl reload``): read the key from Vault now, and the API token again
        (a token file that became unreadable keeps the current token and logs why)."""
        if self.cfg.server.token_file is not None:
            try:
                token = self.cfg.server.read_token()
            except ConfigError as exc:
                log.error("API token not reloaded; keeping the current one: %s", exc)
            else:
                if token != self.api_token:
                    log.info("API token reloaded from %s", self.cfg.server.token_file)
                self.api_token = token
        self.keys.request_refresh("sighup")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)

    def _fatal(self, exc: Exception) -> None:
        """Stop, and let serve() raise: a replayed wrapping token, or no key by the startup
        timeout (the CLI maps them to exit 78 and 75)."""
        self.fatal = exc
        self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Stop accepting solves, let tasks in flight finish (bounded), then close."""
        self.draining = True
        notify("STOPPING=1")
        grace = self.cfg.server.shutdown_grace
        log.info(
            "shutting down", extra={"tasks_in_flight": self.dispatcher.in_flight, "grace": grace}
        )
        if not await self.dispatcher.wait_idle(grace):
            log.warning(
                "grace period over, abandoning tasks",
                extra={"tasks_in_flight": self.dispatcher.in_flight},
            )
        if self._runner is not None:
            await self._runner.cleanup()
        if self._startup_task is not None:
            self._startup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._startup_task
        for task in (self._token_task, self._expiry_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.dispatcher.stop()
        await self.keys.stop()
        await self.provider.close()
        await asyncio.to_thread(self.vault.close)
        if self.cfg.server.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.cfg.server.unix_socket.unlink()

    async def serve_forever(self) -> None:
        # Before the first await: /healthz answers while the first Vault read may still wait,
        # and a SIGHUP (the rotation's nudge) or SIGTERM then must find its handler, not kill
        # the process by the default action (systemd counts death by SIGHUP as a clean stop).
        self.install_signal_handlers()
        await self.start()
        try:
            await self.wait_stopped()
        finally:
            await self.shutdown()
        if self.fatal is not None:
            raise self.fatal


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def parse_solve_request(doc: Any) -> tuple[str, dict[str, str]] | str:
    """``{"method": ..., "params": {...}}`` or ``{"method": ..., <params inline>}``.

    Returns (method, params) or an error message.
    """
    if not isinstance(doc, dict):
        return "body must be a JSON object"
    method = doc.get("method")
    if not isinstance(method, str) or not _METHOD_RE.match(method):
        return "'method' must be a provider method name, e.g. userrecaptcha"
    raw = doc.get("params")
    if raw is None:
        raw = {k: v for k, v in doc.items() if k != "method"}
    elif not isinstance(raw, dict) or len(doc) > 2:
        return "'params' must be an object (and the only other field)"
    params: dict[str, str] = {}
    for name, value in raw.items():
        if name in _RESERVED:
            return f"parameter {name!r} is set by the worker and may not be sent"
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, str | int | float):
            return f"parameter {name!r} must be a string or a number"
        params[str(name)] = str(value)
    return method, params
