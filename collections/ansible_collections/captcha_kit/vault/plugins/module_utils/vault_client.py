# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared connection handling and normalisation for the captcha_kit.vault modules.

The whole API (keep it small; other modules build on it):

Connection
    ``vault_argument_spec(**extra)``
        Argument spec with the common connection options merged with ``extra``:
        ``url`` (default ``$VAULT_ADDR``), ``ca_cert`` (default ``$VAULT_CACERT``; a path, or
        omitted to use the system CAs), ``token`` (default ``$VAULT_TOKEN``, ``no_log``),
        ``timeout`` (seconds, default 30), ``urls`` (more addresses of the same Vault cluster, tried
        in turn; ``$CAPTCHA_KIT_VAULT_ADDRS``, comma separated, always added), ``retry_timeout``
        (seconds, default ``$CAPTCHA_KIT_VAULT_RETRY_TIMEOUT`` or 30). Pass the result to
        ``AnsibleModule(argument_spec=...)``.

    ``get_client(module, check_token=True, token_required=True) -> hvac.Client``
        Builds the client from those options and fails the module with a clear message when hvac
        is missing, the URL is not set, the CA file does not exist, the token is missing, the
        server is unreachable, TLS verification fails, the server is sealed, or (with
        ``check_token``) the token is not valid (``auth/token/lookup-self``). Every request of
        the client goes through ``RetryingAdapter`` (see "HA" below). ``token_required=False``
        gives a client without a token (never ``$VAULT_TOKEN``), for a login.

    ``node_addresses(params) -> list[str]``
        Every Vault address the options name: ``url`` (may be comma separated), ``urls``, then
        ``$CAPTCHA_KIT_VAULT_ADDRS``, without repeats (the order ``get_client`` tries them in).

    ``vault_call(module, what, func, *args, **kwargs)``
        Calls ``func(*args, **kwargs)`` and turns hvac/requests errors into ``module.fail_json``
        with a message that names ``what`` (e.g. ``"read policy captcha-worker-dev"``):
        403 -> "permission denied ... the token lacks the rights ...", 404 -> ``NotFound`` is
        re-raised so callers can treat it as "absent", connection/TLS errors -> as above.
        Messages never contain the token.

    ``vault_call_when_ready(module, what, func, *args, timeout=30.0, **kwargs)``
        Like ``vault_call``, but first waits out a KV mount that is still upgrading to version 2
        (right after it was enabled the server answers "Upgrading from non-versioned to
        versioned data ..." for a moment, longer on a busy machine; a standby that answers reads
        says "Waiting for the primary to upgrade from non-versioned to versioned data ...").

    ``VaultNotFound``, ``VaultForbidden``
        Aliases of ``hvac.exceptions.InvalidPath`` (404) and ``hvac.exceptions.Forbidden`` (403)
        for ``except`` clauses; placeholder exception classes when hvac is missing.

Running a module
    ``run_module(options, handler, **module_kwargs)``
        The ``main()`` of a kit module: builds the ``AnsibleModule`` (connection options plus
        ``options``, check mode supported, ``module_kwargs`` such as ``mutually_exclusive``
        passed on), calls ``handler(module)`` and exits with the result dict it returns. A
        handler checks its input first and calls ``get_client`` only then (the kit's modules all
        do), so bad input fails before any Vault call.

    ``duration_or_fail(module, label, value) -> int``
        ``ttl_to_seconds(value)``, or ``fail_json`` with ``"<label>: <why>"``.

    ``batch_items(module, option, fields) -> (batch, items)``
        For modules that take one thing (``name`` plus ``fields``) or many (``option``, a list of
        dicts with ``name``): whether ``option`` was given, and the items as dicts. Fails when a
        name is repeated.

    ``batch_result(module, option, batch, results) -> dict``
        The module result from one result per item (each with ``name``, ``changed`` and
        ``diff``): the item's own result, or ``{"changed": any, option: results}`` for a batch.
        In diff mode the diff is the item's, or the list of the diffs of the changed items.

    ``with_diff(module, result, before, after) -> dict``
        ``result``, in diff mode with ``diff = {"before": before, "after": after}``.

HA (a raft cluster: leader changes, nodes down)
    ``RetryingAdapter``: the hvac adapter ``get_client`` uses. Each request is sent to the
    address that answered last; on a connection error (not a TLS error), a 5xx answer (500
    "local node not active but active cluster node not found", 502, 503, 504), a 412 (a standby
    not yet up to date) or any error naming a standby / missing active node it tries the next
    address, and after a full round it sleeps (0.25 s doubling to 2 s) and starts again, for at
    most ``retry_timeout`` seconds. With a single address that does not answer at all (refused,
    sealed) it gives up after ``UNREACHABLE_TIMEOUT`` (5 s) instead, so a wrong address fails
    fast (the nodes of a cluster all refuse connections for ~2 s during an election). 4xx answers
    are never retried; read timeouts only for reads. ``adapter.retries`` counts the retries.
    Writes are retried like the Vault Go client does (5xx, dropped connections): the kit's
    writes are idempotent or check-and-set, and the rotation module resumes from its record.
    Read-your-writes: after a write answered with ``X-Vault-Index`` (OpenBao 2.7), every
    request carries that index and ``X-Vault-Inconsistent: forward-active-node``, so a standby
    that answers reads from its own copy (``disable_standby_reads = false``) and has not applied
    the write yet forwards the request to the active node; a 429 to such a request is retried.

Normalising and comparing
    The pure functions (``ttl_to_seconds``, ``normalize_cidr``, ``normalize_cidr_list``,
    ``normalize_str_list``, ``dict_difference``) live in ``normalize.py``, which imports neither
    hvac nor requests, so the filter plugins share the modules' rules without loading them.
"""

from __future__ import annotations

import os
import time
import traceback

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib
from ansible_collections.captcha_kit.vault.plugins.module_utils.normalize import ttl_to_seconds

HVAC_IMPORT_ERROR = None
try:
    import hvac
    import hvac.adapters
    import hvac.exceptions
    import requests

    VaultNotFound = hvac.exceptions.InvalidPath
    VaultForbidden = hvac.exceptions.Forbidden
except ImportError:  # pragma: no cover - reported through fail_json
    HVAC_IMPORT_ERROR = traceback.format_exc()
    hvac = None
    requests = None

    class VaultNotFound(Exception):  # type: ignore[no-redef]
        """Placeholder so ``except VaultNotFound`` works without hvac."""

    class VaultForbidden(Exception):  # type: ignore[no-redef]
        """Placeholder so ``except VaultForbidden`` works without hvac."""


ADMIN_POLICY_HINT = (
    "the token each playbook needs is in docs/tokens.md: policies/captcha-provisioner.hcl to"
    " provision, captcha-deployer-<env> to deploy workers, the rotator AppRole to rotate"
)


def vault_argument_spec(**extra):
    """Common connection options merged with module-specific ``extra`` options."""
    spec = {
        "url": {"type": "str", "fallback": (env_fallback, ["VAULT_ADDR"])},
        "ca_cert": {"type": "path", "fallback": (env_fallback, ["VAULT_CACERT"])},
        "token": {"type": "str", "no_log": True, "fallback": (env_fallback, ["VAULT_TOKEN"])},
        "timeout": {"type": "int", "default": 30},
        "urls": {"type": "list", "elements": "str"},
        "retry_timeout": {
            "type": "float",
            "fallback": (env_fallback, ["CAPTCHA_KIT_VAULT_RETRY_TIMEOUT"]),
        },
    }
    spec.update(extra)
    return spec


def run_module(options, handler, **module_kwargs):
    """Build the module (connection options + ``options``), exit with ``handler``'s result."""
    module = AnsibleModule(
        argument_spec=vault_argument_spec(**options),
        supports_check_mode=True,
        **module_kwargs,
    )
    module.exit_json(**handler(module))


def duration_or_fail(module, label, value):
    """``value`` in seconds (see ``ttl_to_seconds``); a bad value fails with ``label``."""
    try:
        return ttl_to_seconds(value)
    except ValueError as exc:
        module.fail_json(msg=f"{label}: {exc}")
    return None  # not reached: fail_json exits


def batch_items(module, option, fields):
    """``(batch, items)``: the list ``option`` if given, else one item of ``name`` + ``fields``."""
    params = module.params
    batch = params[option] is not None
    items = params[option] if batch else [{f: params[f] for f in ("name", *fields)}]
    names = [item["name"] for item in items]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        module.fail_json(msg=f"{option}: each name once; repeated: {', '.join(repeated)}")
    return batch, items


def batch_result(module, option, batch, results):
    """The module result from the per-item results (their ``diff`` keys are taken out)."""
    diffs = [r.pop("diff") for r in results]
    if batch:
        result = {"changed": any(r["changed"] for r in results), option: results}
        diff = [d for d, r in zip(diffs, results, strict=True) if r["changed"]]
    else:
        result = dict(results[0])
        diff = diffs[0]
    if module._diff and diff:
        result["diff"] = diff
    return result


def with_diff(module, result, before, after):
    """``result``, with ``diff`` (``before`` and ``after``) when the module runs in diff mode."""
    if module._diff:
        result["diff"] = {"before": before, "after": after}
    return result


def _connection_hint(module, exc):
    url = module.params.get("url")
    ca_cert = module.params.get("ca_cert")
    if requests is not None and isinstance(exc, requests.exceptions.SSLError):
        return (
            f"TLS verification of {url} failed with CA file {ca_cert or '(system CAs)'}: "
            "check that VAULT_CACERT / ca_cert is the CA that signed the server certificate "
            f"({_short(exc)})"
        )
    if requests is not None and isinstance(
        exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    ):
        addrs = node_addresses(module.params)
        where = url if len(addrs) < 2 else f"{url} (also tried {', '.join(addrs[1:])})"
        return (
            f"Cannot reach Vault at {where}: is the server running and VAULT_ADDR / url right? "
            f"({_short(exc)})"
        )
    return None


def fail_unreachable(module, exc, prefix="", suffix=""):
    """In an ``except Exception`` block: fail with what a connection or TLS error means and what
    to check (between ``prefix`` and ``suffix``); re-raise anything that is not such an error."""
    hint = _connection_hint(module, exc)
    if hint is None:
        raise exc
    module.fail_json(msg=f"{prefix}{hint}{suffix}")


DEFAULT_RETRY_TIMEOUT = 30.0
UNREACHABLE_TIMEOUT = 5.0
MAX_ROUNDS = 200  # a hard bound besides the time budget
_TRANSIENT_STATUS = frozenset({412, 500, 502, 503, 504})
_TRANSIENT_MARKS = (
    "active cluster node not found",
    "node not active",
    "not the leader",
    "standby",
    "leadership lost",
    "no active node",
)
_SEALED_MARK = "sealed"
# Client-controlled consistency (OpenBao 2.7, Vault Enterprise): a request carrying the index of
# a write is answered only by a node that has applied it; with forward-active-node a standby
# that has not yet forwards the request to the active node instead. Servers without the
# feature ignore both headers.
INDEX_HEADER = "X-Vault-Index"
INCONSISTENT_HEADER = "X-Vault-Inconsistent"


def _split_addrs(value):
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip().rstrip("/") for item in items if str(item).strip()]


def node_addresses(params):
    """``url`` (may itself be comma separated), ``urls``, then $CAPTCHA_KIT_VAULT_ADDRS (an
    operator's extra nodes, always added), without duplicates."""
    seen = []
    extra = _split_addrs(os.environ.get("CAPTCHA_KIT_VAULT_ADDRS"))
    for addr in _split_addrs(params.get("url")) + _split_addrs(params.get("urls")) + extra:
        if addr not in seen:
            seen.append(addr)
    return seen


if hvac is not None:

    class RetryingAdapter(hvac.adapters.JSONAdapter):
        """JSON adapter that survives a leader change: several addresses, bounded retries."""

        def __init__(
            self,
            *args,
            addrs=(),
            retry_timeout=DEFAULT_RETRY_TIMEOUT,
            unreachable_timeout=UNREACHABLE_TIMEOUT,
            sleep=time.sleep,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.addrs = [self.base_uri.rstrip("/")]
            self.addrs += [a for a in _split_addrs(addrs) if a not in self.addrs]
            self.base_uri = self.addrs[0]
            self.retry_timeout = float(retry_timeout)
            # One address that refuses is most likely a wrong one: fail fast. Several addresses
            # are a cluster, whose nodes all refuse connections for a moment during an election.
            self.unreachable_timeout = (
                min(float(unreachable_timeout), self.retry_timeout)
                if len(self.addrs) == 1
                else self.retry_timeout
            )
            self.retries = 0
            self._sleep = sleep
            # Read-your-writes: the storage index of this client's last write (OpenBao 2.7
            # answers a write with X-Vault-Index), sent with every later request.
            self.index = None

        def _round(self):
            start = self.addrs.index(self.base_uri) if self.base_uri in self.addrs else 0
            return self.addrs[start:] + self.addrs[:start]

        def request(self, method, url, headers=None, raise_exception=True, **kwargs):
            started = time.monotonic()
            delay = 0.25
            slept = 0.0
            headers = dict(headers or {})
            if self.index:
                headers[INDEX_HEADER] = self.index
                headers[INCONSISTENT_HEADER] = "forward-active-node"
            for _round in range(MAX_ROUNDS):
                answered = False
                last_exc = None
                last_response = None
                for addr in self._round():
                    self.base_uri = addr
                    try:
                        response = hvac.adapters.RawAdapter.request(
                            self,
                            method,
                            url,
                            headers=dict(headers),
                            raise_exception=False,
                            **kwargs,
                        )
                    except requests.exceptions.SSLError:
                        raise  # a wrong CA is not transient
                    except requests.exceptions.ConnectionError as exc:
                        last_exc = exc
                    except requests.exceptions.Timeout as exc:
                        if str(method).upper() not in ("GET", "LIST", "HEAD"):
                            raise  # a write may have been applied: do not send it twice
                        answered, last_exc = True, exc
                    else:
                        self.index = response.headers.get(INDEX_HEADER) or self.index
                        kind = self._transient(response, INDEX_HEADER in headers)
                        kind = kind if raise_exception else None
                        if kind is None:
                            return self._finish(method, url, response, raise_exception)
                        answered = answered or kind == "busy"
                        last_exc, last_response = None, response
                    self.retries += 1
                elapsed = max(time.monotonic() - started, slept)
                budget = self.retry_timeout if answered else self.unreachable_timeout
                if elapsed + delay > budget or _round == MAX_ROUNDS - 1:
                    break
                self._sleep(delay)
                slept += delay
                delay = min(delay * 2, 2.0)
            if last_exc is not None:
                raise last_exc
            return self._finish(method, url, last_response, raise_exception)

        @staticmethod
        def _transient(response, sent_index=False):
            """None (final answer), ``"busy"`` (cluster answers but cannot serve yet) or
            ``"sealed"`` (counts as unreachable). With ``sent_index``, a 429 is a node that has
            not applied that write yet and cannot forward the request (OpenBao)."""
            if response.ok:
                return None
            if sent_index and response.status_code == 429:
                return "busy"
            try:
                text = response.text.lower()
            except Exception:  # pragma: no cover - undecodable body
                text = ""
            if response.status_code == 503 and _SEALED_MARK in text:
                return "sealed"
            if response.status_code in _TRANSIENT_STATUS:
                return "busy"
            if any(mark in text for mark in _TRANSIENT_MARKS):
                return "busy"
            return None

        def _finish(self, method, url, response, raise_exception):
            if not response.ok and raise_exception and not self.ignore_exceptions:
                self._raise_for_error(method, self.urljoin(self.base_uri, url), response)
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    pass
            return response

else:  # pragma: no cover - get_client reports the missing library
    RetryingAdapter = None


def _short(exc):
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


def get_client(module, check_token=True, token_required=True):
    """Return an authenticated ``hvac.Client`` or fail the module with a clear message.
    ``token_required=False``: a client without a token, for a login (no token check)."""
    if HVAC_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("hvac"), exception=HVAC_IMPORT_ERROR)
    params = module.params
    url = params.get("url")
    if not url:
        module.fail_json(
            msg="No Vault address: set VAULT_ADDR in the environment or the url option"
        )
    ca_cert = params.get("ca_cert")
    verify = True
    if ca_cert:
        if not os.path.isfile(ca_cert):
            module.fail_json(
                msg=f"CA file {ca_cert} does not exist: set VAULT_CACERT / ca_cert to the CA "
                "certificate (PEM) that signed the Vault server certificate"
            )
        verify = ca_cert
    token = params.get("token") if token_required else ""
    if token_required and not token:
        module.fail_json(
            msg=f"No Vault token: export VAULT_TOKEN ({ADMIN_POLICY_HINT}) or pass the token option"
        )
    addrs = node_addresses(params)
    retry_timeout = params.get("retry_timeout")
    client = hvac.Client(
        url=addrs[0],
        token=token,
        verify=verify,
        timeout=params.get("timeout", 30),
        adapter=RetryingAdapter,
        addrs=addrs[1:],
        retry_timeout=DEFAULT_RETRY_TIMEOUT if retry_timeout is None else retry_timeout,
    )
    if check_token and token_required:
        try:
            client.auth.token.lookup_self()
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            module.fail_json(
                msg=f"The Vault token in VAULT_TOKEN / token is not valid at {url} (expired, "
                "revoked or from another server): log in again and export a fresh token"
            )
        except hvac.exceptions.VaultDown as exc:
            module.fail_json(msg=f"Vault at {url} is sealed or down: unseal it first ({exc})")
        except hvac.exceptions.VaultError as exc:
            module.fail_json(msg=f"Vault at {url} refused the token lookup: {_short(exc)}")
        except Exception as exc:  # requests errors: connection, TLS, timeout
            fail_unreachable(module, exc)
    return client


def vault_call(module, what, func, *args, **kwargs):
    """Call ``func`` and map errors to ``fail_json``; ``VaultNotFound`` (404) is re-raised."""
    try:
        return func(*args, **kwargs)
    except VaultNotFound:
        raise
    except hvac.exceptions.Forbidden as exc:
        module.fail_json(
            msg=f"Permission denied to {what}: the token lacks the rights ({ADMIN_POLICY_HINT}); "
            f"Vault said: {_short(exc)}"
        )
    except hvac.exceptions.VaultDown as exc:
        module.fail_json(msg=f"Cannot {what}: Vault is sealed or down ({_short(exc)})")
    except hvac.exceptions.VaultError as exc:
        module.fail_json(msg=f"Cannot {what}: Vault said: {_short(exc)}")
    except Exception as exc:
        fail_unreachable(module, exc, f"Cannot {what}: ")
    return None  # not reached: fail_json exits


# A fresh KV v2 mount answers "Upgrading from non-versioned to versioned data ..." on the active
# node and "Waiting for the primary to upgrade from non-versioned to versioned data ..." on a
# standby that serves reads, until the mount's upgrade is done (a second or so).
KV_UPGRADING_MARK = "from non-versioned to versioned data"


def _still_upgrading(value):
    return KV_UPGRADING_MARK in str(value)


def vault_call_when_ready(module, what, func, *args, timeout=30.0, **kwargs):
    """``vault_call`` that retries while a fresh KV v2 mount is still upgrading."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while time.monotonic() < deadline:
        try:
            result = func(*args, **kwargs)
        except VaultNotFound:
            raise
        except Exception as exc:
            if not _still_upgrading(exc):
                break
        else:
            warnings = result.get("warnings") if isinstance(result, dict) else None
            if not (warnings and any(_still_upgrading(w) for w in warnings)):
                return result
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return vault_call(module, what, func, *args, **kwargs)


def read_kv2_metadata(module, client, mount, path):
    """The KV v2 metadata of ``mount``/``path`` (``data``), or None when the path has none."""
    try:
        return vault_call_when_ready(
            module,
            f"read the metadata of {mount}/{path}",
            client.secrets.kv.v2.read_secret_metadata,
            path,
            mount_point=mount,
        )["data"]
    except VaultNotFound:
        return None
