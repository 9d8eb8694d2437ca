"""A thin typed wrapper around hvac for the worker's needs.

* AppRole login from a role-id file and a secret-id file.
* A response-wrapped secret-id file is unwrapped exactly once: the secret-id, its accessor and
  its expiry time are written as 0600 files and the wrapped file is deleted. A used or expired
  wrapping token raises :class:`WrappingTokenError` (the CLI exits 78: possible tampering).
* The secret-id's expiry (:class:`SecretIdExpiry`) is kept beside it, so a restart still knows
  it; a secret-id from before that file existed is looked up once by its accessor where the
  worker's policy allows it (the kit's does not), and is otherwise reported as unknown.
* The token is renewed before it expires, and a fresh login replaces it when renewal fails.
* Several Vault addresses (HA nodes) are tried in turn, for a bounded number of rounds.
* TLS verification is always on (``verify`` is the CA file or the system store, never False).

hvac is synchronous; the async parts of the worker call this through ``asyncio.to_thread``.
A lock serialises calls, so the token state is never updated by two threads at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests

from .config import VaultConfig
from .secret import Secret

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "this node cannot answer now": try the next address.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    requests.RequestException,  # connection refused/reset, TLS failure, timeout, broken body
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.RateLimitExceeded,
)
_RENEW_AT_FRACTION = 1 / 3  # renew when a third of the lease is left


class VaultError(Exception):
    """Base class; messages never contain a secret."""


class VaultUnavailable(VaultError):
    """No configured Vault address answered."""


class VaultAuthError(VaultError):
    """AppRole login was refused (bad role-id / secret-id, or missing credential files)."""


class VaultLoginHeldBack(VaultAuthError):
    """No login sent: too many refused logins lately (would lock the env's role-id)."""


class WrappingTokenError(VaultError):
    """The response-wrapped secret-id could not be unwrapped: used, expired or tampered with."""


class SecretNotFound(VaultError):
    """The key path does not exist (or its current version is deleted)."""


@dataclass(frozen=True)
class KvSecret:
    """A KV v2 read: the data (not shown in repr), its version and custom_metadata."""

    data: Mapping[str, Any] = field(repr=False)
    version: int
    custom_metadata: Mapping[str, str]
    created_time: str = ""


def write_private_file(path: Path, content: str) -> None:
    """Write *content* atomically to *path* with mode 0600 (never briefly wider)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, content.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


NEVER = "never"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class SecretIdExpiry:
    """When the host's secret-id expires: at ``expires_at`` (Unix time), ``never`` (a secret-id
    issued without a TTL), or unknown (neither: a secret-id from before the worker kept its
    expiry, with no lookup allowed)."""

    expires_at: float | None = None
    never: bool = False

    @property
    def known(self) -> bool:
        return self.never or self.expires_at is not None

    def remaining(self, now: float) -> float | None:
        """Seconds left at *now* (negative once expired); None when it never expires or is
        unknown."""
        return None if self.expires_at is None else self.expires_at - now

    def text(self) -> str:
        """The expiry as the file and /healthz show it: ISO 8601 UTC, ``never`` or ``unknown``."""
        if self.never:
            return NEVER
        if self.expires_at is None:
            return UNKNOWN
        return (
            dt.datetime.fromtimestamp(self.expires_at, dt.UTC)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z")
        )


def parse_rfc3339(text: str) -> float | None:
    """Unix time of an RFC 3339 time as Vault prints it (nanoseconds, ``Z`` or an offset);
    None when it is empty, unparseable, or Vault's zero time (``0001-01-01…``: no expiry)."""
    text = text.strip()
    if not text or text.startswith("0001-01-01"):
        return None
    text = text.replace("Z", "+00:00").replace("z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # at most microseconds for datetime
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        stamp = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def _expiry_file_text(cfg: VaultConfig) -> str:
    """The expiry file's content; "" when there is none, it cannot be read, or it is older than
    the secret-id file (then it belongs to an earlier secret-id)."""
    path = cfg.secret_id_expiry_file
    try:
        text = path.read_text(encoding="utf-8").strip()
        if path.stat().st_mtime_ns < cfg.secret_id_file.stat().st_mtime_ns:
            return ""
    except OSError:
        return ""
    return text


def read_secret_id_expiry(cfg: VaultConfig) -> SecretIdExpiry:
    """The expiry kept beside the secret-id file (``unknown`` when there is none of its own)."""
    text = _expiry_file_text(cfg)
    if text == NEVER:
        return SecretIdExpiry(never=True)
    return SecretIdExpiry(expires_at=parse_rfc3339(text))


def write_secret_id_expiry(cfg: VaultConfig, expiry: SecretIdExpiry) -> None:
    """Keep *expiry* beside the secret-id file (0600 like its neighbours; not a secret); an
    unknown expiry removes the file, so an earlier secret-id's expiry is never shown. (The file
    says ``unknown`` when Vault refused to look the expiry up: not asked again.)"""
    if expiry.known:
        write_private_file(cfg.secret_id_expiry_file, expiry.text() + "\n")
    else:
        cfg.secret_id_expiry_file.unlink(missing_ok=True)


def _has_content(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def _read_credential(path: Path, what: str) -> Secret:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise VaultAuthError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not value:
        raise VaultAuthError(f"the {what} file {path} is empty")
    return Secret(value)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created 0600) between processes of this host."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class VaultClient:
    """AppRole session against one or more Vault addresses."""

    def __init__(self, cfg: VaultConfig, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._cfg = cfg
        self._sleep = sleep
        self._lock = threading.RLock()
        verify: str | bool = str(cfg.ca_file) if cfg.ca_file else True
        # token="" keeps hvac from picking up VAULT_TOKEN or ~/.vault-token.
        self._clients = [
            hvac.Client(url=addr, token="", verify=verify, timeout=cfg.timeout)
            for addr in cfg.addrs
        ]
        self._verify = verify
        self._current = 0
        # True during a read asked for promptly (a nudged worker, see read_kv): steady pauses.
        self._prompt = False
        # Why a wrapped secret-id was refused while a secret-id on disk was kept ("" if never).
        self.refused_wrapping = ""
        # Wall-clock times of the logins Vault refused lately, kept in the state directory so
        # that a restart (systemd, after the startup timeout) does not forget them.
        self._refusals_file = cfg.secret_id_file.with_name(cfg.secret_id_file.name + ".refusals")
        self._token: Secret | None = None
        self._lease = 0.0
        self._renewable = False
        self._capped = False  # the last renewal hit max_ttl: log in next time
        self._expires_at = 0.0  # monotonic
        # When the secret-id expires (from the file beside it), and the accessor whose expiry
        # was looked up in Vault already (at most one lookup per secret-id and process).
        self._secret_id_expiry = read_secret_id_expiry(cfg)
        self._expiry_looked_up = ""

    # ------------------------------------------------------------------ addresses / retries
    @property
    def current_addr(self) -> str:
        return self._cfg.addrs[self._current]

    def _call(self, what: str, op: Callable[[Any], T]) -> T:
        """Run *op* against each address in turn, for ``retries`` rounds."""
        last = "no attempt"
        n = len(self._clients)
        for attempt in range(self._cfg.retries):
            for step in range(n):
                index = (self._current + step) % n
                try:
                    result = op(self._clients[index])
                except _UNAVAILABLE as exc:
                    last = f"{self._cfg.addrs[index]}: {type(exc).__name__}"
                    log.warning(
                        "vault address unavailable",
                        extra={"op": what, "addr": self._cfg.addrs[index]},
                    )
                    continue
                if index != self._current:
                    log.info("vault address switched", extra={"addr": self._cfg.addrs[index]})
                    self._current = index
                return result
            if attempt + 1 < self._cfg.retries:
                delay = self._cfg.retry_delay * (1 if self._prompt else 2**attempt)
                self._sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 (jitter, not crypto)
        raise VaultUnavailable(f"{what}: no Vault address answered (last: {last})")

    def _set_token(self, token: Secret | None) -> None:
        self._token = token
        for client in self._clients:
            client.token = token.reveal() if token else ""

    # ------------------------------------------------------------------ secret-id handling
    def unwrap_secret_id(self) -> bool:
        """Unwrap the wrapped secret-id file if there is one. True when it was unwrapped.

        A wrapping token that was already used, has expired or wraps something else raises
        :class:`WrappingTokenError` (possible tampering) when there is no secret-id to fall back
        on. When the host already holds a secret-id (a leftover file from an earlier delivery,
        say) the worker keeps that one, sets the refused file aside as ``<name>.refused`` (the
        role's next run sees it, destroys this host's other secret-ids and delivers a new one)
        and logs the refusal loudly: one bad file must not brick a worker that can log in."""
        with self._lock:
            try:
                return self._unwrap_secret_id()
            except WrappingTokenError as exc:
                wrapped = self._cfg.wrapped_secret_id_file
                if wrapped is None or not _has_content(self._cfg.secret_id_file):
                    raise
                refused = wrapped.with_name(wrapped.name + ".refused")
                os.replace(wrapped, refused)
                self.refused_wrapping = str(exc)
                log.critical(
                    "wrapped secret-id refused; keeping the secret-id this host already has",
                    extra={"error": str(exc), "set_aside": str(refused)},
                )
                return False

    def _unwrap_secret_id(self) -> bool:
        wrapped_file = self._cfg.wrapped_secret_id_file
        if wrapped_file is None or not wrapped_file.exists():
            return False
        # The worker and `captcha-solver take-secret-id` (the role, right after delivering the
        # token) may both find the file: one of them unwraps, the other then finds nothing. An
        # unwrap lost to the other process would look like interception.
        with self._lock, _file_lock(wrapped_file.with_name(wrapped_file.name + ".lock")):
            if not wrapped_file.exists():
                return False
            wrapping = _read_credential(wrapped_file, "wrapped secret-id")
            tampering = (
                f"the response-wrapped secret-id in {wrapped_file} was already unwrapped or has"
                " expired: possible tampering (someone else may hold the secret-id). Revoke it"
                " and deploy a new wrapped secret-id."
            )

            def lookup(client: Any) -> Any:
                return client.adapter.post(
                    "/v1/sys/wrapping/lookup", json={"token": wrapping.reveal()}
                )

            try:
                info = self._call("unwrap", lookup)
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
                raise WrappingTokenError(tampering) from _scrubbed(exc)
            creation_path = str((info.get("data") or {}).get("creation_path", ""))
            # The secret-id was made with the wrapping token: its TTL counts from then.
            issued_at = parse_rfc3339(str((info.get("data") or {}).get("creation_time") or ""))
            mount = self._cfg.approle_mount.strip("/")
            if not (
                creation_path.startswith(f"auth/{mount}/role/")
                and creation_path.endswith("/secret-id")
            ):
                raise WrappingTokenError(
                    f"the wrapping token in {wrapped_file} was not created by an AppRole"
                    f" secret-id request (creation path {creation_path!r}): possible tampering"
                )

            def unwrap(client: Any) -> Any:
                one_shot = hvac.Client(
                    url=client.url,
                    token=wrapping.reveal(),
                    verify=self._verify,
                    timeout=self._cfg.timeout,
                )
                try:
                    return one_shot.sys.unwrap()
                finally:
                    one_shot.adapter.close()

            try:
                response = self._call("unwrap", unwrap)
            except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
                raise WrappingTokenError(tampering) from _scrubbed(exc)
            data = response.get("data") or {}
            secret_id = data.get("secret_id")
            if not isinstance(secret_id, str) or not secret_id:
                raise WrappingTokenError(
                    f"the wrapping token in {wrapped_file} did not contain a secret-id"
                )
            held = Secret(secret_id)  # masked in any log line while this block holds it
            write_private_file(self._cfg.secret_id_file, held.reveal() + "\n")
            accessor = str(data.get("secret_id_accessor", ""))
            write_private_file(self._cfg.secret_id_accessor_file, accessor + "\n")
            expiry = _expiry_from_ttl(data.get("secret_id_ttl"), issued_at or time.time())
            self._secret_id_expiry = expiry
            try:  # only a report: it must not undo the unwrap (the token is used up now)
                write_secret_id_expiry(self._cfg, expiry)
            except OSError as exc:
                log.warning("cannot keep the secret-id expiry", extra={"error": str(exc)})
            wrapped_file.unlink()
            log.info(
                "secret-id unwrapped",
                extra={
                    "secret_id_file": str(self._cfg.secret_id_file),
                    "accessor_file": str(self._cfg.secret_id_accessor_file),
                    "secret_id_expires": expiry.text(),
                },
            )
            return True

    # ------------------------------------------------------------------ secret-id expiry
    @property
    def secret_id_expiry(self) -> SecretIdExpiry:
        """When the secret-id this worker logs in with expires (see :class:`SecretIdExpiry`)."""
        return self._secret_id_expiry

    def _look_up_unknown_expiry(self, role_name: str) -> None:
        """A secret-id without a known expiry (delivered before the worker kept it): ask Vault
        once, by its accessor, with the worker's own token. The kit's worker policy does not
        grant this (``auth/<mount>/role/<role>/secret-id-accessor/lookup``): the expiry then
        stays unknown until the next delivery, which the role makes when it is due anyway."""
        try:
            accessor = self._cfg.secret_id_accessor_file.read_text(encoding="utf-8").strip()
        except OSError:
            accessor = ""
        if not accessor or not role_name or accessor == self._expiry_looked_up:
            return
        self._expiry_looked_up = accessor
        if _expiry_file_text(self._cfg) == UNKNOWN:  # refused for this secret-id before
            return

        def op(client: Any) -> Any:
            return client.auth.approle.read_secret_id_accessor(
                role_name, accessor, mount_point=self._cfg.approle_mount
            )

        try:
            response = self._call("secret-id lookup", op)
        except (VaultUnavailable, hvac.exceptions.VaultError) as exc:
            log.info(
                "secret-id expiry unknown: its accessor lookup was refused or failed"
                " (the worker's policy need not allow it); known after the next delivery",
                extra={"error": _reason(exc)},
            )
            if isinstance(exc, hvac.exceptions.Forbidden):  # not again for this secret-id
                with contextlib.suppress(OSError):
                    write_private_file(self._cfg.secret_id_expiry_file, UNKNOWN + "\n")
            return
        info = (response or {}).get("data") if isinstance(response, dict) else None
        if not isinstance(info, dict) or "expiration_time" not in info:
            return
        expires = str(info.get("expiration_time") or "")
        at = parse_rfc3339(expires)
        if expires.startswith("0001-01-01"):  # Vault's zero time: no expiry
            expiry = SecretIdExpiry(never=True)
        elif at is not None:
            expiry = SecretIdExpiry(expires_at=at)
        else:
            return
        try:
            write_secret_id_expiry(self._cfg, expiry)
        except OSError as exc:
            log.warning("cannot keep the secret-id expiry", extra={"error": str(exc)})
        self._secret_id_expiry = expiry
        log.info("secret-id expiry looked up", extra={"secret_id_expires": expiry.text()})

    # ------------------------------------------------------------------ token lifecycle
    def login(self) -> None:
        """AppRole login (unwrapping a wrapped secret-id first, if one is waiting)."""
        with self._lock:
            if self.unwrap_secret_id():  # a new secret-id: earlier refusals were for the old one
                self._refusals_file.unlink(missing_ok=True)
            else:  # the file may have been replaced since: its expiry is what the file says
                self._secret_id_expiry = read_secret_id_expiry(self._cfg)
            role_id = _read_credential(self._cfg.role_id_file, "role-id")
            secret_id = _read_credential(self._cfg.secret_id_file, "secret-id")

            def op(client: Any) -> Any:
                return client.auth.approle.login(
                    role_id=role_id.reveal(),
                    secret_id=secret_id.reveal(),
                    use_token=False,
                    mount_point=self._cfg.approle_mount,
                )

            self._hold_back_refused_logins()
            # The lease starts when Vault handles the request: count it from before sending,
            # so a slow answer (a busy host) never makes the token look younger than it is.
            sent = time.monotonic()
            try:
                response = self._call("login", op)
            except (
                hvac.exceptions.InvalidRequest,
                hvac.exceptions.Forbidden,
                hvac.exceptions.Unauthorized,
                hvac.exceptions.InvalidPath,
            ) as exc:
                self._record_refusal()
                raise VaultAuthError(
                    f"AppRole login at {self._cfg.approle_mount!r} refused: {_reason(exc)}"
                ) from None
            auth = response["auth"]
            self._set_token(Secret(str(auth["client_token"])))
            self._lease = float(auth.get("lease_duration") or 0)
            self._renewable = bool(auth.get("renewable"))
            self._capped = False
            self._expires_at = sent + self._lease if self._lease else float("inf")
            log.info(
                "vault login ok",
                extra={"addr": self.current_addr, "ttl": self._lease, "renewable": self._renewable},
            )
            if not self._secret_id_expiry.known:
                metadata = auth.get("metadata") or {}
                self._look_up_unknown_expiry(str(metadata.get("role_name") or ""))

    def _recent_refusals(self) -> list[float]:
        """Refused logins within the window (from the state file; unreadable = none)."""
        now = time.time()
        try:
            times = [float(x) for x in self._refusals_file.read_text().split()]
        except (OSError, ValueError):
            return []
        return sorted(t for t in times if 0 <= now - t < self._cfg.login_refusal_window)

    def _record_refusal(self) -> None:
        times = [*self._recent_refusals(), time.time()]
        try:
            write_private_file(self._refusals_file, "\n".join(f"{t:.3f}" for t in times) + "\n")
        except OSError as exc:  # the state directory is the worker's own: this is unexpected
            log.warning("cannot record a refused login", extra={"error": str(exc)})

    def _hold_back_refused_logins(self) -> None:
        """Raise instead of sending a login that could lock the env's role-id."""
        refused = self._recent_refusals()
        window = self._cfg.login_refusal_window
        if len(refused) < self._cfg.login_refusal_limit:
            return
        wait = window - (time.time() - refused[0])
        raise VaultLoginHeldBack(
            f"AppRole login held back for {wait:.0f} s after {len(refused)} refused"
            f" logins in {window:g} s: every worker of this env shares the role-id, which Vault"
            " locks after a few refused logins (user lockout), so this worker waits rather than"
            " lock its env out; deploy a new secret-id to this host"
        )

    def seconds_until_renewal(self) -> float:
        """How long until :meth:`ensure_token` would renew (0 when there is no token)."""
        if self._token is None:
            return 0.0
        if self._expires_at == float("inf"):
            return float("inf")
        return max(0.0, self._expires_at - self._lease * _RENEW_AT_FRACTION - time.monotonic())

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def ensure_token(self) -> None:
        """Log in if there is no token; renew it when a third of its lease is left."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self.login()
                return
            if self.seconds_until_renewal() > 0:
                return
            if self._renewable and not self._capped:
                sent = time.monotonic()
                try:
                    response = self._call("renew", lambda client: client.auth.token.renew_self())
                except (VaultUnavailable, hvac.exceptions.VaultError) as exc:
                    # Refused (e.g. past max TTL: OpenBao answers 500) or the node is away:
                    # a fresh login settles both (and raises VaultUnavailable if Vault is down).
                    log.warning("token renewal failed, logging in again: %s", _reason(exc))
                else:
                    lease = float(response["auth"].get("lease_duration") or 0)
                    # Near max_ttl the renewal is capped (a shorter lease): use the rest of it,
                    # then log in afresh instead of renewing a token about to die.
                    if lease > self._lease * _RENEW_AT_FRACTION:
                        self._expires_at = sent + lease
                        self._capped = lease < self._lease
                        log.debug("vault token renewed", extra={"ttl": lease})
                        return
                    log.info("vault token near its max TTL, logging in again")
            self.login()

    # ------------------------------------------------------------------ KV v2
    def read_kv(self, mount: str, path: str, *, prompt: bool = False) -> KvSecret:
        """Read the current version of a KV v2 secret (re-login once on 403).

        ``prompt``: a rotation waits for this read (the worker was nudged): the pauses between
        the rounds over the addresses stay at ``retry_delay`` instead of doubling, so that a
        read during a raft election lands soon after the new leader has taken over."""
        with self._lock:
            self._prompt = prompt
            try:
                return self._read_kv(mount, path)
            finally:
                self._prompt = False

    def _read_kv(self, mount: str, path: str) -> KvSecret:
        """``read_kv`` with the lock held."""
        self.ensure_token()

        def op(client: Any) -> Any:
            return client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            )

        try:
            response = self._call("read", op)
        except hvac.exceptions.Forbidden:
            log.info("vault read forbidden with the current token, logging in again")
            self.login()
            try:
                response = self._call("read", op)
            except hvac.exceptions.Forbidden as exc:
                raise VaultAuthError(f"read of {mount}/{path} forbidden: {_reason(exc)}") from None
        except hvac.exceptions.InvalidPath:
            raise SecretNotFound(f"no current version at {mount}/data/{path}") from None
        data = response["data"]
        metadata = data.get("metadata") or {}
        custom = metadata.get("custom_metadata") or {}
        return KvSecret(
            data=dict(data.get("data") or {}),
            version=int(metadata.get("version") or 0),
            custom_metadata={str(k): str(v) for k, v in custom.items()},
            created_time=str(metadata.get("created_time") or ""),
        )

    def close(self) -> None:
        for client in self._clients:
            client.adapter.close()


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason from an hvac error (Vault's own error strings)."""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)[:300]
    return type(exc).__name__


def _scrubbed(exc: BaseException) -> VaultError:
    return VaultError(_reason(exc))


def _expiry_from_ttl(ttl: Any, issued_at: float) -> SecretIdExpiry:
    """The expiry of a secret-id issued at *issued_at* with Vault's ``secret_id_ttl`` (seconds;
    0 = no expiry; missing or malformed = unknown)."""
    if isinstance(ttl, bool) or ttl is None:
        return SecretIdExpiry()
    try:
        seconds = float(ttl)
    except (TypeError, ValueError):
        return SecretIdExpiry()
    if seconds != seconds or seconds < 0:
        return SecretIdExpiry()
    if seconds == 0:
        return SecretIdExpiry(never=True)
    return SecretIdExpiry(expires_at=issued_at + seconds)
