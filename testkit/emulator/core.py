"""State and protocol logic of the CaptchaAI emulator (no HTTP in this module).

The wire protocol mirrors CaptchaAI's legacy, 2captcha-compatible endpoints:

* ``in.php``: submit a task. Plain answer ``OK|<id>``; with ``json=1``
  ``{"status": 1, "request": "<id>"}``.
* ``res.php?action=get&id=<id>``: ``OK|<answer>`` / ``CAPCHA_NOT_READY`` /
  ``ERROR_CAPTCHA_UNSOLVABLE``; JSON ``{"status": 1, "request": "<answer>"}`` or
  ``{"status": 0, "request": "<code>"}``.
* ``res.php?action=get&ids=<id1>,<id2>,...``: one answer per id, in the order asked,
  joined with ``|``; each item is the bare answer (no ``OK|`` prefix),
  ``CAPCHA_NOT_READY``, ``ERROR_CAPTCHA_UNSOLVABLE`` or ``ERROR_WRONG_CAPTCHA_ID``.
  JSON: ``{"status": 1, "request": "<the same | joined string>"}``.
* ``res.php?action=getbalance``: ``12.34500`` (JSON: status 1, request the same string).
* ``res.php?action=reportgood|reportbad&id=<id>``: ``OK_REPORT_RECORDED``.

Errors are the bare code (plain) or ``{"status": 0, "request": "<code>"}`` (JSON).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import logging
import math
import random
import re
import string
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

log = logging.getLogger("captchaai_emulator")

KEY_RE = re.compile(r"[0-9a-f]{32}")
ID_RE = re.compile(r"[0-9]{1,20}")

# Error and status codes, spelled as the real service spells them.
NOT_READY = "CAPCHA_NOT_READY"
ERROR_WRONG_USER_KEY = "ERROR_WRONG_USER_KEY"
ERROR_KEY_DOES_NOT_EXIST = "ERROR_KEY_DOES_NOT_EXIST"
ERROR_ZERO_BALANCE = "ERROR_ZERO_BALANCE"
ERROR_NO_SLOT_AVAILABLE = "ERROR_NO_SLOT_AVAILABLE"
ERROR_CAPTCHA_UNSOLVABLE = "ERROR_CAPTCHA_UNSOLVABLE"
ERROR_WRONG_CAPTCHA_ID = "ERROR_WRONG_CAPTCHA_ID"
ERROR_WRONG_ID_FORMAT = "ERROR_WRONG_ID_FORMAT"
ERROR_EMPTY_ACTION = "ERROR_EMPTY_ACTION"
ERROR_BAD_PARAMETERS = "ERROR_BAD_PARAMETERS"
ERROR_PAGEURL = "ERROR_PAGEURL"
ERROR_GOOGLEKEY = "ERROR_GOOGLEKEY"
ERROR_SITEKEY = "ERROR_SITEKEY"
ERROR_ZERO_CAPTCHA_FILESIZE = "ERROR_ZERO_CAPTCHA_FILESIZE"
ERROR_TOO_BIG_CAPTCHA_FILESIZE = "ERROR_TOO_BIG_CAPTCHA_FILESIZE"
ERROR_WRONG_FILE_EXTENSION = "ERROR_WRONG_FILE_EXTENSION"
ERROR_IMAGE_TYPE_NOT_SUPPORTED = "ERROR_IMAGE_TYPE_NOT_SUPPORTED"
ERROR_UPLOAD = "ERROR_UPLOAD"
ERROR_DUPLICATE_REPORT = "ERROR_DUPLICATE_REPORT"
REPORT_NOT_RECORDED = "REPORT_NOT_RECORDED"
OK_REPORT_RECORDED = "OK_REPORT_RECORDED"
IP_BANNED = "IP_BANNED"

TOKEN_METHODS = ("userrecaptcha", "hcaptcha", "turnstile")
IMAGE_METHODS = ("base64", "post")
METHODS = TOKEN_METHODS + IMAGE_METHODS

MIN_IMAGE_BYTES = 100
MAX_IMAGE_BYTES = 1024 * 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")

_TOKEN_ALPHABET = string.ascii_letters + string.digits + "-_"
_TEXT_ALPHABET = string.ascii_lowercase + string.digits
_UNKNOWN_STATS_LIMIT = 10_000


def mask_key(key: str) -> str:
    """``***`` + last four characters (only ``***`` for very short strings)."""
    return "***" + key[-4:] if len(key) >= 8 else "***"


def key_id(key: str) -> str:
    """A stable, non-reversible identifier for a key (first 16 hex of its SHA-256)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Solve-delay distributions


@dataclass(frozen=True)
class DelaySpec:
    """A solve-delay distribution in nominal seconds (before the time scale).

    ``fixed:S`` (or just ``S``), ``uniform:LO:HI``, ``normal:MU:SIGMA`` (truncated at 0),
    ``exp:MEAN``.
    """

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> DelaySpec:
        parts = spec.strip().split(":")
        try:
            nums = tuple(float(p) for p in parts[1:])
            if len(parts) == 1:
                return cls._checked("fixed", (float(parts[0]),), spec)
        except ValueError:
            raise ValueError(f"bad solve-delay spec {spec!r}: numbers expected") from None
        return cls._checked(parts[0].lower(), nums, spec)

    @classmethod
    def _checked(cls, kind: str, nums: tuple[float, ...], spec: str) -> DelaySpec:
        arity = {"fixed": 1, "uniform": 2, "normal": 2, "exp": 1}
        if kind not in arity:
            raise ValueError(
                f"bad solve-delay spec {spec!r}: kind must be one of fixed, uniform, normal, exp"
            )
        if len(nums) != arity[kind]:
            raise ValueError(f"bad solve-delay spec {spec!r}: {kind} takes {arity[kind]} numbers")
        if any(not math.isfinite(n) or n < 0 for n in nums):
            raise ValueError(f"bad solve-delay spec {spec!r}: numbers must be finite and >= 0")
        if kind == "uniform" and nums[0] > nums[1]:
            raise ValueError(f"bad solve-delay spec {spec!r}: LO > HI")
        return cls(kind, nums)

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.params[0]
        if self.kind == "uniform":
            return rng.uniform(self.params[0], self.params[1])
        if self.kind == "normal":
            return max(0.0, rng.gauss(self.params[0], self.params[1]))
        mean = self.params[0]
        return rng.expovariate(1.0 / mean) if mean > 0 else 0.0

    def mean(self) -> float:
        """Nominal mean (ignoring the truncation of ``normal`` at 0)."""
        if self.kind == "uniform":
            return (self.params[0] + self.params[1]) / 2
        return self.params[0]

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])


# ---------------------------------------------------------------------------
# Options


@dataclass
class Options:
    """Run-time options; every field can be set at start (CLI) and later (admin API).

    Durations of the solve delay are nominal seconds multiplied by ``time_scale``;
    the ban window and ban duration are real seconds (not scaled).
    """

    solve_delay: str = "normal:12:4"
    method_delays: dict[str, str] = field(default_factory=dict)
    time_scale: float = 1.0
    seed: int | None = None
    unsolvable_rate: float = 0.0
    price: float = 0.001
    default_balance: float = 10.0
    default_max_slots: int = 0  # 0 = unlimited
    ban_threshold: int = 20  # bad-key requests per address within ban_window; 0 = never ban
    ban_window: float = 60.0
    ban_duration: float = 300.0
    http_error_rate: float = 0.0  # share of public requests answered with HTTP 500
    result_ttl: float = 1800.0  # real seconds a finished task stays readable
    max_bulk_ids: int = 0  # 0 = unlimited ids per bulk res.php call

    def validate(self) -> None:
        DelaySpec.parse(self.solve_delay)
        for method, spec in self.method_delays.items():
            if method not in METHODS:
                raise ValueError(f"method_delays: unknown method {method!r}")
            DelaySpec.parse(spec)
        checks: list[tuple[str, bool]] = [
            ("time_scale must be > 0", self.time_scale > 0),
            ("unsolvable_rate must be in [0, 1]", 0 <= self.unsolvable_rate <= 1),
            ("http_error_rate must be in [0, 1]", 0 <= self.http_error_rate <= 1),
            ("price must be >= 0", self.price >= 0),
            ("default_balance must be >= 0", self.default_balance >= 0),
            ("default_max_slots must be >= 0", self.default_max_slots >= 0),
            ("ban_threshold must be >= 0", self.ban_threshold >= 0),
            ("ban_window must be > 0", self.ban_window > 0),
            ("ban_duration must be >= 0", self.ban_duration >= 0),
            ("result_ttl must be > 0", self.result_ttl > 0),
            ("max_bulk_ids must be >= 0", self.max_bulk_ids >= 0),
        ]
        for message, ok in checks:
            if not ok:
                raise ValueError(message)

    def updated(self, changes: Mapping[str, Any]) -> Options:
        """A validated copy with ``changes`` applied; unknown names are an error."""
        known = {f.name: f for f in fields(self)}
        data = asdict(self)
        for name, value in changes.items():
            if name not in known:
                raise ValueError(f"unknown option {name!r}; known: {', '.join(sorted(known))}")
            data[name] = _coerce(name, value)
        new = Options(**data)
        new.validate()
        return new


_FLOAT_OPTS = {
    "time_scale",
    "unsolvable_rate",
    "price",
    "default_balance",
    "ban_window",
    "ban_duration",
    "http_error_rate",
    "result_ttl",
}
_INT_OPTS = {"default_max_slots", "ban_threshold", "max_bulk_ids"}


def _coerce(name: str, value: Any) -> Any:
    try:
        if name in _FLOAT_OPTS:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if name in _INT_OPTS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if name == "seed":
            return None if value is None else int(value)
        if name == "solve_delay":
            return str(DelaySpec.parse(str(value)))
        if name == "method_delays":
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(DelaySpec.parse(str(v))) for k, v in value.items()}
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and "spec" in str(exc):
            raise
        raise ValueError(f"option {name}: bad value {value!r}") from None
    return value


# ---------------------------------------------------------------------------
# State


COUNTER_NAMES = (
    "in_php",  # in.php requests carrying this key (any answer)
    "res_php",  # res.php requests carrying this key (any action, any answer)
    "res_get",  # res.php action=get requests (single id or bulk)
    "res_get_ids",  # task ids asked for by action=get (a bulk call adds one per id)
    "getbalance",
    "reportgood",
    "reportbad",
    "bad_key",  # requests refused with ERROR_KEY_DOES_NOT_EXIST (unknown or revoked)
    "submitted",  # tasks accepted by in.php
    "solved",  # tasks whose answer was delivered at least once
    "unsolvable",  # tasks delivered as ERROR_CAPTCHA_UNSOLVABLE
    "not_ready",  # CAPCHA_NOT_READY answers (one per id)
    "no_slot",  # ERROR_NO_SLOT_AVAILABLE answers
    "zero_balance",  # ERROR_ZERO_BALANCE answers
    "ip_banned",  # requests with this key refused with IP_BANNED
    "injected",  # answers replaced by an injected fault
)


@dataclass
class KeyStats:
    fingerprint: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))

    def bump(self, name: str, n: int = 1) -> None:
        self.counts[name] += n


@dataclass
class KeyRecord:
    key: str = field(repr=False)
    balance: float
    max_slots: int  # 0 = unlimited
    revoked: bool = False
    # ready times (monotonic) of tasks not yet ready: their count is the slots in use
    inflight: list[float] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return (
            f"KeyRecord(key={mask_key(self.key)}, balance={self.balance}, "
            f"max_slots={self.max_slots}, revoked={self.revoked})"
        )

    def in_flight(self, now: float) -> int:
        heap = self.inflight
        while heap and heap[0] <= now:
            heapq.heappop(heap)
        return len(heap)


@dataclass(slots=True)
class Task:
    id: int
    kid: str
    method: str
    created: float
    ready_at: float
    nominal_delay: float
    unsolvable: bool
    answer: str
    cost: float
    delivered_at: float | None = None
    polls: int = 0
    report: str | None = None


@dataclass(frozen=True)
class Reply:
    """One protocol answer: ``status``/``request`` for JSON, ``plain`` for text mode."""

    status: int
    request: str
    plain: str

    @classmethod
    def error(cls, code: str) -> Reply:
        return cls(0, code, code)

    @classmethod
    def ok(cls, value: str, *, prefix: bool = True) -> Reply:
        return cls(1, value, f"OK|{value}" if prefix else value)

    def as_json(self) -> dict[str, Any]:
        return {"status": self.status, "request": self.request}


@dataclass
class Injection:
    endpoint: str  # "in.php", "res.php" or "any"
    answer: str  # error code to answer with (HTTP 200), or body for http_status != 200
    http_status: int
    remaining: int


class Emulator:
    """All emulator state. Not thread-safe: used from one asyncio loop."""

    def __init__(self, options: Options | None = None, *, clock: Any = time.monotonic) -> None:
        self._initial = options or Options()
        self._initial.validate()
        self._clock = clock
        self.reset()

    # -- lifecycle ---------------------------------------------------------

    def reset(self) -> None:
        """Back to the start state: start options, no keys, tasks, counters or bans."""
        self.options = Options(**asdict(self._initial))
        self.keys: dict[str, KeyRecord] = {}  # by key_id
        self.stats: dict[str, KeyStats] = {}  # by key_id (also unknown and revoked keys)
        self.tasks: dict[int, Task] = {}
        self._expiry: deque[tuple[float, int]] = deque()  # (created, id) in creation order
        self._bad_key_times: dict[str, deque[float]] = {}
        self.banned_until: dict[str, float] = {}
        self.injections: list[Injection] = []
        self.globals: dict[str, int] = {
            "requests": 0,
            "malformed_key": 0,
            "unknown_key": 0,
            "ip_banned": 0,
            "bans": 0,
            "http_errors": 0,
            "injected": 0,
        }
        self._apply_options()
        self._next_id = 70_000_000 + self.rng.randrange(1_000_000) * 10

    def set_options(self, changes: Mapping[str, Any]) -> Options:
        self.options = self.options.updated(changes)
        self._apply_options(reseed="seed" in changes)
        return self.options

    def _apply_options(self, *, reseed: bool = True) -> None:
        if reseed:
            seed = self.options.seed
            # not for secrets: reproducible delays, failures and fake answers
            self.rng = random.Random(seed)  # noqa: S311
        self._default_delay = DelaySpec.parse(self.options.solve_delay)
        self._method_delay = {m: DelaySpec.parse(s) for m, s in self.options.method_delays.items()}

    def now(self) -> float:
        return float(self._clock())

    # -- keys ----------------------------------------------------------------

    def _stats(self, kid: str, key: str) -> KeyStats:
        st = self.stats.get(kid)
        if st is None:
            if len(self.stats) >= _UNKNOWN_STATS_LIMIT + len(self.keys):
                # drop the oldest entry that belongs to no registered key
                for old in self.stats:
                    if old not in self.keys:
                        del self.stats[old]
                        break
            st = self.stats[kid] = KeyStats(mask_key(key))
        return st

    def add_key(self, key: str, balance: float | None = None, max_slots: int | None = None) -> str:
        if not KEY_RE.fullmatch(key):
            raise ValueError("key must be 32 lowercase hex characters")
        bal = self.options.default_balance if balance is None else float(balance)
        slots = self.options.default_max_slots if max_slots is None else int(max_slots)
        if bal < 0 or slots < 0:
            raise ValueError("balance and max_slots must be >= 0")
        kid = key_id(key)
        self.keys[kid] = KeyRecord(key=key, balance=bal, max_slots=slots)
        self._stats(kid, key)
        log.info("key added %s balance=%s max_slots=%s", mask_key(key), bal, slots or "unlimited")
        return kid

    def update_key(
        self, key: str, balance: float | None = None, max_slots: int | None = None
    ) -> KeyRecord:
        rec = self.keys.get(key_id(key))
        if rec is None:
            raise KeyError("no such key")
        if balance is not None:
            if float(balance) < 0:
                raise ValueError("balance must be >= 0")
            rec.balance = float(balance)
        if max_slots is not None:
            if int(max_slots) < 0:
                raise ValueError("max_slots must be >= 0")
            rec.max_slots = int(max_slots)
        log.info(
            "key updated %s balance=%s max_slots=%s", mask_key(key), rec.balance, rec.max_slots
        )
        return rec

    def revoke_key(self, key: str) -> None:
        rec = self.keys.get(key_id(key))
        if rec is None:
            raise KeyError("no such key")
        rec.revoked = True
        log.info("key revoked %s", mask_key(key))

    def key_info(self, key: str) -> dict[str, Any]:
        """Counters and state of one key (also for unknown keys: all zero, exists false)."""
        kid = key_id(key)
        return self._key_info(kid, self.stats.get(kid) or KeyStats(mask_key(key)))

    def _key_info(self, kid: str, st: KeyStats) -> dict[str, Any]:
        rec = self.keys.get(kid)
        now = self.now()
        info: dict[str, Any] = dict(st.counts)
        info.update(
            fingerprint=st.fingerprint,
            key_id=kid,
            exists=rec is not None,
            revoked=bool(rec and rec.revoked),
            balance=rec.balance if rec else None,
            max_slots=rec.max_slots if rec else None,
            in_flight=rec.in_flight(now) if rec else 0,
        )
        return info

    def all_counters(self) -> dict[str, Any]:
        return {
            "keys": [self._key_info(kid, st) for kid, st in self.stats.items()],
            "global": dict(self.globals),
            "tasks_stored": len(self.tasks),
            "banned": self.bans(),
        }

    def bans(self) -> dict[str, float]:
        now = self.now()
        return {a: round(u - now, 3) for a, u in self.banned_until.items() if u > now}

    # -- faults ----------------------------------------------------------------

    def inject(self, endpoint: str, answer: str, count: int = 1, http_status: int = 200) -> None:
        if endpoint not in ("in.php", "res.php", "any"):
            raise ValueError("endpoint must be in.php, res.php or any")
        if count < 1 or not (100 <= http_status <= 599):
            raise ValueError("count must be >= 1 and http_status a valid HTTP status")
        self.injections.append(Injection(endpoint, answer, http_status, count))

    def take_injection(self, endpoint: str) -> Injection | None:
        for inj in self.injections:
            if inj.endpoint in (endpoint, "any"):
                inj.remaining -= 1
                if inj.remaining <= 0:
                    self.injections.remove(inj)
                self.globals["injected"] += 1
                return inj
        return None

    def random_http_error(self) -> bool:
        rate = self.options.http_error_rate
        if rate > 0 and self.rng.random() < rate:
            self.globals["http_errors"] += 1
            return True
        return False

    # -- authentication and bans -----------------------------------------------

    def _banned(self, addr: str, now: float) -> bool:
        until = self.banned_until.get(addr)
        if until is None:
            return False
        if until > now:
            return True
        del self.banned_until[addr]
        return False

    def _record_bad_key(self, addr: str, now: float) -> None:
        threshold = self.options.ban_threshold
        if threshold <= 0:
            return
        times = self._bad_key_times.setdefault(addr, deque())
        times.append(now)
        cutoff = now - self.options.ban_window
        while times and times[0] < cutoff:
            times.popleft()
        if len(times) >= threshold:
            times.clear()
            self.banned_until[addr] = now + self.options.ban_duration
            self.globals["bans"] += 1
            log.warning(
                "address %s banned for %.0f s after %d bad-key requests",
                addr,
                self.options.ban_duration,
                threshold,
            )

    def _authenticate(
        self, params: Mapping[str, str], addr: str, endpoint: str
    ) -> tuple[float, KeyRecord, KeyStats] | Reply:
        """The time of the request (expired tasks dropped by then), the key's record and its
        stats; or the error reply to send."""
        now = self.now()
        self._expire(now)
        self.globals["requests"] += 1
        key = params.get("key", "")
        kid = key_id(key) if KEY_RE.fullmatch(key) else None
        st = self._stats(kid, key) if kid else None
        if st is not None:
            st.bump("in_php" if endpoint == "in.php" else "res_php")
        if self._banned(addr, now):
            self.globals["ip_banned"] += 1
            if st is not None:
                st.bump("ip_banned")
            return Reply.error(IP_BANNED)
        if kid is None or st is None:
            self.globals["malformed_key"] += 1
            self._record_bad_key(addr, now)
            return Reply.error(ERROR_WRONG_USER_KEY)
        rec = self.keys.get(kid)
        if rec is None or rec.revoked:
            self.globals["unknown_key"] += 1
            st.bump("bad_key")
            self._record_bad_key(addr, now)
            return Reply.error(ERROR_KEY_DOES_NOT_EXIST)
        return now, rec, st

    # -- in.php ------------------------------------------------------------------

    def submit(
        self,
        params: Mapping[str, str],
        addr: str,
        upload: tuple[str, bytes] | None = None,
    ) -> Reply:
        caller = self._authenticate(params, addr, "in.php")
        if isinstance(caller, Reply):
            return caller
        now, rec, st = caller
        method = params.get("method", "")
        problem = self._check_task_params(method, params, upload)
        if problem is not None:
            return Reply.error(problem)
        price = self.options.price
        if rec.balance < price or rec.balance <= 0:
            st.bump("zero_balance")
            return Reply.error(ERROR_ZERO_BALANCE)
        if rec.max_slots and rec.in_flight(now) >= rec.max_slots:
            st.bump("no_slot")
            return Reply.error(ERROR_NO_SLOT_AVAILABLE)
        rec.balance = round(rec.balance - price, 6)
        spec = self._method_delay.get(method, self._default_delay)
        nominal = spec.sample(self.rng)
        ready_at = now + nominal * self.options.time_scale
        unsolvable = self.rng.random() < self.options.unsolvable_rate
        tid = self._next_id
        self._next_id += 1 + self.rng.randrange(3)
        self.tasks[tid] = Task(
            id=tid,
            kid=key_id(rec.key),
            method=method,
            created=now,
            ready_at=ready_at,
            nominal_delay=nominal,
            unsolvable=unsolvable,
            answer="" if unsolvable else self._make_answer(method),
            cost=price,
        )
        self._expiry.append((now, tid))
        heapq.heappush(rec.inflight, ready_at)
        st.bump("submitted")
        log.debug("in.php %s method=%s -> id %d", mask_key(rec.key), method, tid)
        return Reply.ok(str(tid))

    @staticmethod
    def _check_task_params(
        method: str, params: Mapping[str, str], upload: tuple[str, bytes] | None
    ) -> str | None:
        if method not in METHODS:
            return ERROR_BAD_PARAMETERS
        if method == "userrecaptcha":
            if not params.get("googlekey"):
                return ERROR_GOOGLEKEY
            if not params.get("pageurl"):
                return ERROR_PAGEURL
            return None
        if method in ("hcaptcha", "turnstile"):
            if not params.get("sitekey"):
                return ERROR_SITEKEY
            if not params.get("pageurl"):
                return ERROR_PAGEURL
            return None
        if method == "base64":
            body = params.get("body", "")
            if not body:
                return ERROR_ZERO_CAPTCHA_FILESIZE
            try:
                data = base64.b64decode(body.strip(), validate=True)
            except (binascii.Error, ValueError):
                return ERROR_UPLOAD
            return _check_image(data)
        # method == "post": multipart upload in field "file"
        if upload is None:
            return ERROR_UPLOAD
        filename, data = upload
        if filename and not filename.lower().endswith(IMAGE_EXTENSIONS):
            return ERROR_WRONG_FILE_EXTENSION
        return _check_image(data)

    def _make_answer(self, method: str) -> str:
        rng = self.rng
        if method == "userrecaptcha":
            return "03AGdBq2" + "".join(rng.choices(_TOKEN_ALPHABET, k=240))
        if method == "hcaptcha":
            return "P1_eyJ0eXAiOiJKV1Qi" + "".join(rng.choices(_TOKEN_ALPHABET, k=200))
        if method == "turnstile":
            return "0." + "".join(rng.choices(_TOKEN_ALPHABET, k=160))
        return "".join(rng.choices(_TEXT_ALPHABET, k=rng.randint(5, 6)))

    # -- res.php -----------------------------------------------------------------

    def result(self, params: Mapping[str, str], addr: str) -> Reply:
        caller = self._authenticate(params, addr, "res.php")
        if isinstance(caller, Reply):
            return caller
        now, rec, st = caller
        action = params.get("action", "")
        kid = key_id(rec.key)
        if action == "getbalance":
            st.bump("getbalance")
            return Reply.ok(f"{rec.balance:.5f}", prefix=False)
        if action == "get":
            st.bump("res_get")
            if "ids" in params:
                return self._get_bulk(params["ids"], kid, st, now)
            return self._get_one(params.get("id", ""), kid, st, now)
        if action in ("reportgood", "reportbad"):
            st.bump(action)
            return self._report(params.get("id", ""), kid, action, rec, now)
        return Reply.error(ERROR_EMPTY_ACTION)

    def _lookup(self, raw: str, kid: str) -> Task | str:
        raw = raw.strip()
        if not ID_RE.fullmatch(raw):
            return ERROR_WRONG_ID_FORMAT
        task = self.tasks.get(int(raw))
        if task is None or task.kid != kid:
            return ERROR_WRONG_CAPTCHA_ID
        return task

    def _poll(self, task: Task, st: KeyStats, now: float) -> tuple[bool, str]:
        """(finished, answer-or-code) for one task, updating counters."""
        task.polls += 1
        if now < task.ready_at:
            st.bump("not_ready")
            return False, NOT_READY
        if task.delivered_at is None:
            task.delivered_at = now
            if task.unsolvable:
                st.bump("unsolvable")
                rec = self.keys.get(task.kid)
                if rec is not None:  # unsolvable tasks are not charged
                    rec.balance = round(rec.balance + task.cost, 6)
            else:
                st.bump("solved")
        if task.unsolvable:
            return True, ERROR_CAPTCHA_UNSOLVABLE
        return True, task.answer

    def _get_one(self, raw: str, kid: str, st: KeyStats, now: float) -> Reply:
        st.bump("res_get_ids")
        found = self._lookup(raw, kid)
        if isinstance(found, str):
            return Reply.error(found)
        _, answer = self._poll(found, st, now)
        if answer in (NOT_READY, ERROR_CAPTCHA_UNSOLVABLE):
            return Reply.error(answer)
        return Reply.ok(answer)

    def _get_bulk(self, raw: str, kid: str, st: KeyStats, now: float) -> Reply:
        ids = [i for i in raw.split(",") if i.strip()]
        if not ids:
            return Reply.error(ERROR_WRONG_ID_FORMAT)
        limit = self.options.max_bulk_ids
        if limit and len(ids) > limit:
            return Reply.error(ERROR_BAD_PARAMETERS)
        st.bump("res_get_ids", len(ids))
        out: list[str] = []
        for raw_id in ids:
            found = self._lookup(raw_id, kid)
            out.append(found if isinstance(found, str) else self._poll(found, st, now)[1])
        joined = "|".join(out)
        return Reply(1, joined, joined)

    def _report(self, raw: str, kid: str, action: str, rec: KeyRecord, now: float) -> Reply:
        found = self._lookup(raw, kid)
        if isinstance(found, str):
            return Reply.error(found)
        if found.delivered_at is None or found.unsolvable:
            return Reply.error(REPORT_NOT_RECORDED)
        if found.report is not None:
            return Reply.error(ERROR_DUPLICATE_REPORT)
        found.report = "good" if action == "reportgood" else "bad"
        return Reply.ok(OK_REPORT_RECORDED, prefix=False)

    # -- bookkeeping -------------------------------------------------------------

    def _expire(self, now: float) -> None:
        """Forget tasks created more than result_ttl (+ their delay) ago; O(1) amortised."""
        ttl = self.options.result_ttl
        exp = self._expiry
        while exp and exp[0][0] < now - ttl:
            _, tid = exp[0]
            task = self.tasks.get(tid)
            if task is not None and task.ready_at > now - ttl:
                break  # still (recently) in progress: keep it and everything younger
            exp.popleft()
            self.tasks.pop(tid, None)

    def task_report(self, key: str) -> list[dict[str, Any]]:
        """Per-task timings of one key (real seconds, relative to the task's creation)."""
        kid = key_id(key)
        rows = []
        for t in self.tasks.values():
            if t.kid != kid:
                continue
            rows.append(
                {
                    "id": t.id,
                    "method": t.method,
                    "created": t.created,
                    "delay": t.ready_at - t.created,
                    "nominal_delay": t.nominal_delay,
                    "unsolvable": t.unsolvable,
                    "delivered_after": (
                        None if t.delivered_at is None else t.delivered_at - t.created
                    ),
                    "added_latency": (
                        None if t.delivered_at is None else t.delivered_at - t.ready_at
                    ),
                    "polls": t.polls,
                    "report": t.report,
                }
            )
        return rows


def _check_image(data: bytes) -> str | None:
    if len(data) < MIN_IMAGE_BYTES:
        return ERROR_ZERO_CAPTCHA_FILESIZE
    if len(data) > MAX_IMAGE_BYTES:
        return ERROR_TOO_BIG_CAPTCHA_FILESIZE
    if not (
        data.startswith(b"\x89PNG\r\n\x1a\n")
        or data.startswith(b"\xff\xd8\xff")
        or data.startswith((b"GIF87a", b"GIF89a"))
    ):
        return ERROR_IMAGE_TYPE_NOT_SUPPORTED
    return None


class Endpoints:
    """Where an emulator listens: the CaptchaAI API on ``port``, the admin API on ``admin_port``."""

    host: str
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"
