# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""An in-memory Vault for the unit tests of the captcha_kit.vault modules.

``FakeVault`` holds the server state the modules read and write (mounts, KV v2 settings and
secret versions, auth methods and their user lockout, policies, AppRole roles and secret-ids, audit
devices, tokens and their capabilities). ``FakeVault.client`` stands in for ``hvac.Client``: the
conftest puts it in hvac's place, so ``get_client`` builds it and the modules run unchanged.

Only the hvac methods the modules call exist. Each takes exactly the arguments of the hvac method
of the same name (checked against hvac's own signature, so a wrong call fails here as it would
against hvac), answers with the shape the real server sends, and raises hvac's exceptions
(``InvalidPath`` for 404, ``Forbidden``, ``InvalidRequest``). ``client.adapter.post`` knows the
three raw endpoints the modules write (KV v2 config, auth tune, AppRole role) and fails the test
on any other.

What tests look at:
    ``calls``   every hvac method called, in order (``"sys.read_policy"``, ``"adapter.post"``)
    ``writes``  ``(method, arguments given)`` of every call meant to change the server (also
                one made to fail with ``fail``)
    ``clients`` the keyword arguments of every ``hvac.Client(...)`` built

What tests set up: the ``add_*`` helpers, ``fail(method, exc)`` (that method raises ``exc``),
``before(method, hook)`` (``hook()`` runs first: a change by someone else), and a few switches
(``lockout_supported``, ``lockout_ignored``, ``audit_api_refused``, ``unknown_accessor_status``,
``upgrading_answers``, ``wrap_secret_ids``).

Not a Vault: no ACLs (a token's capabilities are a table), no leases, nothing expires; the
integration suites run a real OpenBao.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import secrets
from types import SimpleNamespace

import hvac.exceptions
from hvac.api.auth_methods.approle import AppRole
from hvac.api.auth_methods.token import Token
from hvac.api.secrets_engines.kv_v2 import KvV2
from hvac.api.system_backend import SystemBackend
from hvac.v1 import Client as HvacClient

KV_UPGRADING = (
    "Upgrading from non-versioned to versioned data. This backend will be unavailable for a "
    "brief period and will resume service shortly."
)
OPENBAO_AUDIT_REFUSAL = (
    "cannot enable audit device via API: use declarative, config-based audit device management"
)
ROLE_DEFAULTS = {
    "bind_secret_id": True,
    "local_secret_ids": False,
    "secret_id_bound_cidrs": [],
    "secret_id_num_uses": 0,
    "secret_id_ttl": 0,
    "token_bound_cidrs": [],
    "token_explicit_max_ttl": 0,
    "token_max_ttl": 0,
    "token_no_default_policy": False,
    "token_num_uses": 0,
    "token_period": 0,
    "token_policies": [],
    "token_ttl": 0,
    "token_type": "default",
}
LOCKOUT_DEFAULTS = {"threshold": 5, "duration": 900, "counter_reset": 900, "disable": False}


def _accessor(prefix):
    return f"{prefix}_{secrets.token_hex(4)}"


def go_duration(seconds):
    """Seconds as Vault prints a duration: ``0s``, ``90s``, ``1h0m0s``."""
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339_in(seconds):
    """The time ``seconds`` from now as Vault prints it (nanoseconds, a UTC offset)."""
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123+00:00"


def hvac_method(real, write=False):
    """Make a fake method take exactly the arguments of hvac's ``real`` one.

    The fake is called with every argument by name (hvac's defaults filled in, ``**kwargs``
    spread out); the call is recorded in ``vault.calls`` (and, with the arguments the caller
    gave, in ``vault.writes`` with ``write``), then an injected failure or hook runs before the
    fake itself.
    """
    signature = inspect.signature(real)

    def by_name(bound):
        named = dict(bound.arguments)
        named.pop("self")
        for pname, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and pname in named:
                named.update(named.pop(pname))
        return named

    def decorate(fake):
        @functools.wraps(fake)
        def call(api, *args, **kwargs):
            bound = signature.bind(api, *args, **kwargs)
            given = by_name(bound)
            bound.apply_defaults()
            named = by_name(bound)
            return api.vault.dispatch(
                f"{api.prefix}.{fake.__name__}", write, given, lambda: fake(api, **named)
            )

        return call

    return decorate


class FakeVault:
    """Server state and the hvac surface the modules use; see the module docstring."""

    def __init__(self):
        self.token = secrets.token_hex(16)
        self.tokens = {
            self.token: {
                "display_name": "token-admin",
                "policies": ["root"],
                "caps": {},
                "elsewhere": ["root"],
            },
        }
        self.mounts = {
            "cubbyhole/": {"type": "cubbyhole", "description": "per-token private storage"},
            "sys/": {"type": "system", "description": "system endpoints"},
        }
        self.kv2_config = {}  # mount -> {"max_versions", "cas_required", "delete_version_after"}
        self.kv2_versions = {}  # (mount, path) -> current version
        self.kv2_path_settings = {}  # (mount, path) -> {"cas_required", "max_versions"}
        self.auth_methods = {"token/": {"type": "token", "description": "token based credentials"}}
        self.lockout = {}  # auth path -> settings as LOCKOUT_DEFAULTS
        self.policies = {"default": "# Allow tokens to look up their own properties\n", "root": ""}
        self.roles = {}  # (mount, name) -> settings
        self.role_ids = {}  # (mount, name) -> role-id
        self.secret_ids = {}  # (mount, name) -> {accessor: lookup data}
        self.audit_devices = {}  # "file/" -> {"type", "description", "options"}
        self.locked = {}  # auth path -> role-ids the user lockout holds locked

        self.calls = []
        self.writes = []
        self.clients = []
        self._failures = {}
        self._hooks = {}

        self.lockout_supported = True  # False: the server neither reports nor takes user lockout
        self.lockout_unset = set()  # mounts never tuned: no user lockout reported until a tune
        self.lockout_ignored = set()  # settings the tune endpoint silently does not take
        self.audit_api_refused = False  # True: enabling an audit device answers as OpenBao
        self.unknown_accessor_status = 404  # or 204: how an unknown secret-id accessor answers
        self.upgrading_answers = 0  # KV v2 reads that still answer "Upgrading ..."
        self.wrap_secret_ids = True  # False: generate_secret_id answers without wrap_info

    # ----------------------------------------------------------------- test set-up
    def fail(self, method, exc):
        """Every later call of ``method`` (e.g. ``"sys.read_policy"``) raises ``exc``."""
        self._failures[method] = exc

    def before(self, method, hook):
        """``hook()`` runs before every later call of ``method``."""
        self._hooks[method] = hook

    def add_token(self, policies=("default",), caps=None, display_name="token-user"):
        """A token with these policies and capabilities (path -> list, ``deny`` on any other
        path); returns the token."""
        token = secrets.token_hex(16)
        self.tokens[token] = {
            "display_name": display_name,
            "policies": list(policies),
            "caps": dict(caps or {}),
            "elsewhere": ["deny"],
        }
        return token

    def add_mount(self, path, engine="kv", version=2, description="", **kv2_settings):
        """Mount ``engine`` at ``path``; a KV v2 mount gets its settings (seconds)."""
        mount = {"type": engine, "description": description, "accessor": _accessor(engine)}
        if engine == "kv":
            mount["options"] = {"version": str(version)}
        self.mounts[path + "/"] = mount
        if engine == "kv" and version == 2:
            config = {"max_versions": 0, "cas_required": False, "delete_version_after": 0}
            config.update(kv2_settings)
            self.kv2_config[path] = config

    def add_auth(self, path, method="approle", description="", **lockout):
        """Enable auth ``method`` at ``auth/<path>/`` with the default user lockout."""
        self.auth_methods[path + "/"] = {
            "type": method,
            "description": description,
            "accessor": _accessor(f"auth_{method}"),
        }
        self.lockout[path] = {**LOCKOUT_DEFAULTS, **lockout}

    def add_role(self, name, mount="approle", **settings):
        """An AppRole role with Vault's defaults and ``settings`` (as the server stores them)."""
        self.roles[(mount, name)] = {**ROLE_DEFAULTS, **settings}
        self.role_ids[(mount, name)] = secrets.token_hex(8)
        self.secret_ids[(mount, name)] = {}

    def add_secret_id(self, role, mount="approle", ttl=None, num_uses=0):
        """A secret-id of ``role`` (``ttl`` seconds, None = no expiry); returns its accessor."""
        accessor = _accessor("sid")
        self.secret_ids[(mount, role)][accessor] = {
            "expiration_time": "0001-01-01T00:00:00Z" if ttl is None else rfc3339_in(ttl),
            "secret_id_num_uses": num_uses,
            "metadata": {},
        }
        return accessor

    def add_audit_device(self, path="file", device="file", **options):
        """An audit device of type ``device`` enabled at ``path`` with ``options``."""
        self.audit_devices[path + "/"] = {
            "type": device,
            "description": "",
            "options": dict(options),
            "local": False,
        }

    # ----------------------------------------------------------------- client side
    def client(self, *args, **kwargs):
        """Stands in for ``hvac.Client(...)``: the same arguments, a client of this server."""
        inspect.signature(HvacClient.__init__).bind(None, *args, **kwargs)
        self.clients.append({k: v for k, v in kwargs.items() if k != "token"})
        return FakeClient(self, kwargs.get("token"))

    def dispatch(self, name, write, given, run):
        """Record the call, raise an injected failure or run a hook, then ``run()``."""
        self.calls.append(name)
        if write:
            self.writes.append((name, given))
        if name in self._failures:
            raise self._failures[name]
        if name in self._hooks:
            self._hooks[name]()
        return run()

    # ----------------------------------------------------------------- server side
    def answer_upgrading(self):
        """True (once per count in ``upgrading_answers``) while a fresh KV v2 mount upgrades."""
        if self.upgrading_answers > 0:
            self.upgrading_answers -= 1
            return True
        return False


def _not_found(what):
    return hvac.exceptions.InvalidPath(f"no handler for route '{what}'. route entry not found.")


class _Api:
    """One part of the client (``client.sys``, ...); ``prefix`` names its calls."""

    prefix = ""

    def __init__(self, client):
        self.client = client
        self.vault = client.vault


class FakeSys(_Api):
    """``client.sys``"""

    prefix = "sys"

    @hvac_method(SystemBackend.list_mounted_secrets_engines)
    def list_mounted_secrets_engines(self):
        return {"data": {k: dict(v) for k, v in self.vault.mounts.items()}}

    @hvac_method(SystemBackend.enable_secrets_engine, write=True)
    def enable_secrets_engine(self, backend_type, path, description, options, **_):
        path = path or backend_type
        if path + "/" in self.vault.mounts:
            raise hvac.exceptions.InvalidRequest(f"path is already in use at {path}/")
        version = int((options or {}).get("version") or 1)
        self.vault.add_mount(path, backend_type, version=version, description=description or "")

    @hvac_method(SystemBackend.tune_mount_configuration, write=True)
    def tune_mount_configuration(self, path, description, **_):
        self.vault.mounts[path.strip("/") + "/"]["description"] = description

    @hvac_method(SystemBackend.list_auth_methods)
    def list_auth_methods(self):
        return {"data": {k: dict(v) for k, v in self.vault.auth_methods.items()}}

    @hvac_method(SystemBackend.enable_auth_method, write=True)
    def enable_auth_method(self, method_type, description, path, **_):
        path = path or method_type
        if path + "/" in self.vault.auth_methods:
            raise hvac.exceptions.InvalidRequest(f"path is already in use at auth/{path}/")
        self.vault.add_auth(path, method_type, description=description or "")

    @hvac_method(SystemBackend.tune_auth_method, write=True)
    def tune_auth_method(self, path, description, **_):
        self.vault.auth_methods[path + "/"]["description"] = description

    @hvac_method(SystemBackend.read_auth_method_tuning)
    def read_auth_method_tuning(self, path):
        if path + "/" not in self.vault.auth_methods:
            raise _not_found(f"sys/auth/{path}/tune")
        data = {"description": self.vault.auth_methods[path + "/"]["description"]}
        if self.vault.lockout_supported and path not in self.vault.lockout_unset:
            lockout = self.vault.lockout[path]
            data.update(
                user_lockout_threshold=lockout["threshold"],
                user_lockout_duration=lockout["duration"],
                user_lockout_counter_reset_duration=lockout["counter_reset"],
                user_lockout_disable=lockout["disable"],
            )
        return {"data": data, **data}

    @hvac_method(SystemBackend.read_policy)
    def read_policy(self, name):
        if name not in self.vault.policies:
            raise _not_found(f"sys/policy/{name}")
        rules = self.vault.policies[name]
        return {"data": {"name": name, "rules": rules}, "name": name, "rules": rules}

    @hvac_method(SystemBackend.create_or_update_policy, write=True)
    def create_or_update_policy(self, name, policy, **_):
        self.vault.policies[name] = policy

    @hvac_method(SystemBackend.delete_policy, write=True)
    def delete_policy(self, name):
        self.vault.policies.pop(name, None)

    @hvac_method(SystemBackend.list_enabled_audit_devices)
    def list_enabled_audit_devices(self):
        devices = {k: dict(v) for k, v in self.vault.audit_devices.items()}
        return {"request_id": secrets.token_hex(4), "lease_id": "", "data": devices, **devices}

    @hvac_method(SystemBackend.enable_audit_device, write=True)
    def enable_audit_device(self, device_type, description, options, path, **_):
        if self.vault.audit_api_refused:
            raise hvac.exceptions.InvalidRequest(OPENBAO_AUDIT_REFUSAL)
        if path + "/" in self.vault.audit_devices:
            raise hvac.exceptions.InvalidRequest(f"path already in use: {path}/")
        self.vault.add_audit_device(path, device_type, **(options or {}))
        self.vault.audit_devices[path + "/"]["description"] = description or ""

    @hvac_method(SystemBackend.get_capabilities)
    def get_capabilities(self, paths, **_):
        token = self.vault.tokens[self.client.token]
        data = {path: list(token["caps"].get(path, token["elsewhere"])) for path in paths}
        return {"data": data, **data}


class FakeKv2(_Api):
    """``client.secrets.kv.v2``"""

    prefix = "kv2"

    def _config(self, mount_point):
        if mount_point not in self.vault.kv2_config:
            raise _not_found(f"{mount_point}/config")
        return self.vault.kv2_config[mount_point]

    @hvac_method(KvV2.read_configuration)
    def read_configuration(self, mount_point):
        config = self._config(mount_point)
        answer = {
            "data": {
                "max_versions": config["max_versions"],
                "cas_required": config["cas_required"],
                "delete_version_after": go_duration(config["delete_version_after"]),
            }
        }
        if self.vault.answer_upgrading():
            answer["warnings"] = [KV_UPGRADING]
        return answer

    @hvac_method(KvV2.read_secret_metadata)
    def read_secret_metadata(self, path, mount_point):
        self._config(mount_point)
        if self.vault.answer_upgrading():
            raise hvac.exceptions.InvalidRequest(KV_UPGRADING)
        version = self.vault.kv2_versions.get((mount_point, path))
        settings = self.vault.kv2_path_settings.get((mount_point, path))
        if version is None and settings is None:
            raise _not_found(f"{mount_point}/metadata/{path}")
        settings = settings or {"cas_required": False, "max_versions": 0}
        return {"data": {"current_version": version or 0, "versions": {}, **settings}}

    @hvac_method(KvV2.create_or_update_secret, write=True)
    def create_or_update_secret(self, path, secret, cas, mount_point):
        self._config(mount_point)
        current = self.vault.kv2_versions.get((mount_point, path), 0)
        if cas is not None and cas != current:
            raise hvac.exceptions.InvalidRequest(
                "check-and-set parameter did not match the current version"
            )
        self.vault.kv2_versions[(mount_point, path)] = current + 1
        return {"data": {"version": current + 1, "created_time": "", "destroyed": False}}


class FakeAppRole(_Api):
    """``client.auth.approle``"""

    prefix = "approle"

    def _role(self, role_name, mount_point):
        if (mount_point, role_name) not in self.vault.roles:
            raise _not_found(f"auth/{mount_point}/role/{role_name}")
        return self.vault.roles[(mount_point, role_name)]

    @hvac_method(AppRole.login)
    def login(self, role_id, secret_id, use_token, mount_point):
        # Only injected failures are faked (vault.fail("approle.login", ...)); a real login
        # runs against OpenBao in tests/test_rotation_scheduled.py.
        raise AssertionError("the fake Vault has no AppRole login; inject a failure")

    @hvac_method(AppRole.read_role)
    def read_role(self, role_name, mount_point):
        settings = self._role(role_name, mount_point)
        return {"data": {**settings, "policies": settings["token_policies"], "period": 0}}

    @hvac_method(AppRole.delete_role, write=True)
    def delete_role(self, role_name, mount_point):
        for table in (self.vault.roles, self.vault.role_ids, self.vault.secret_ids):
            table.pop((mount_point, role_name), None)

    @hvac_method(AppRole.read_role_id)
    def read_role_id(self, role_name, mount_point):
        self._role(role_name, mount_point)
        return {"data": {"role_id": self.vault.role_ids[(mount_point, role_name)]}}

    @hvac_method(AppRole.read_secret_id_accessor)
    def read_secret_id_accessor(self, role_name, secret_id_accessor, mount_point):
        self._role(role_name, mount_point)
        info = self.vault.secret_ids[(mount_point, role_name)].get(secret_id_accessor)
        if info is None:
            if self.vault.unknown_accessor_status == 204:
                return None
            raise _not_found(f"auth/{mount_point}/role/{role_name}/secret-id-accessor/lookup")
        return {"data": {**info, "secret_id_accessor": secret_id_accessor}}

    @hvac_method(AppRole.destroy_secret_id_accessor, write=True)
    def destroy_secret_id_accessor(self, role_name, secret_id_accessor, mount_point):
        self._role(role_name, mount_point)
        self.vault.secret_ids[(mount_point, role_name)].pop(secret_id_accessor, None)

    @hvac_method(AppRole.generate_secret_id, write=True)
    def generate_secret_id(self, role_name, metadata, cidr_list, mount_point, wrap_ttl, **_):
        settings = self._role(role_name, mount_point)
        accessor = self.vault.add_secret_id(
            role_name, mount=mount_point, ttl=settings["secret_id_ttl"] or None
        )
        if not (wrap_ttl and self.vault.wrap_secret_ids):
            return {"data": {"secret_id_accessor": accessor, "secret_id": secrets.token_hex(8)}}
        return {
            "wrap_info": {
                "token": "hvs." + secrets.token_hex(12),
                "accessor": _accessor("wrap"),
                "ttl": int(str(wrap_ttl).rstrip("s")),
                "creation_path": f"auth/{mount_point}/role/{role_name}/secret-id",
                "wrapped_accessor": accessor,
            }
        }


class FakeToken(_Api):
    """``client.auth.token``"""

    prefix = "token"

    @hvac_method(Token.lookup_self)
    def lookup_self(self, **_):
        info = self.vault.tokens.get(self.client.token)
        if info is None:
            raise hvac.exceptions.Forbidden("permission denied")
        return {"data": {"display_name": info["display_name"], "policies": info["policies"]}}

    @hvac_method(Token.revoke_self, write=True)
    def revoke_self(self):
        self.vault.tokens.pop(self.client.token, None)


class FakeAdapter(_Api):
    """``client.adapter``: the raw writes the modules send, recorded as ``adapter.post``."""

    prefix = "adapter"

    def get(self, url, **_):
        if url.removeprefix("/v1/").strip("/") != "sys/locked-users":
            raise AssertionError(f"the fake Vault has no endpoint GET {url}")
        return self.vault.dispatch(f"{self.prefix}.get", False, {"url": url}, self._locked_users)

    def _locked_users(self):
        mounts = [
            {
                "mount_accessor": self.vault.auth_methods[path + "/"]["accessor"],
                "counts": len(ids),
                "alias_identifiers": list(ids),
            }
            for path, ids in self.vault.locked.items()
            if ids
        ]
        total = sum(m["counts"] for m in mounts)
        namespace = {"namespace_id": "root", "namespace_path": "", "counts": total}
        return {"data": {"by_namespace": [{**namespace, "mount_accessors": mounts}]}}

    def post(self, url, json=None, **_):
        parts = url.removeprefix("/v1/").strip("/").split("/")
        if parts[:2] == ["sys", "auth"] and parts[-1] == "tune":
            apply = functools.partial(self._tune, "/".join(parts[2:-1]), json)
        elif parts[0] == "auth" and len(parts) == 4 and parts[2] == "role":
            apply = functools.partial(self._role, parts[1], parts[3], json)
        elif len(parts) == 2 and parts[1] == "config":
            apply = functools.partial(self._kv2_config, parts[0], json)
        elif len(parts) > 2 and parts[1] == "metadata":
            apply = functools.partial(self._kv2_metadata, parts[0], "/".join(parts[2:]), json)
        else:
            raise AssertionError(f"the fake Vault has no endpoint POST {url}")
        return self.vault.dispatch(f"{self.prefix}.post", True, {"url": url, "json": json}, apply)

    def _tune(self, path, json):
        config = json["user_lockout_config"]
        given = {
            "threshold": int(config["lockout_threshold"]),
            "duration": int(config["lockout_duration"].rstrip("s")),
            "counter_reset": int(config["lockout_counter_reset_duration"].rstrip("s")),
            "disable": bool(config["lockout_disable"]),
        }
        if not self.vault.lockout_supported:
            return
        ignored = self.vault.lockout_ignored
        self.vault.lockout[path].update({k: v for k, v in given.items() if k not in ignored})
        self.vault.lockout_unset.discard(path)

    def _kv2_metadata(self, mount, path, json):
        unknown = set(json) - {"cas_required", "max_versions"}
        assert not unknown, f"the kit sends no other metadata field, got {unknown}"
        settings = self.vault.kv2_path_settings.setdefault(
            (mount, path), {"cas_required": False, "max_versions": 0}
        )
        settings.update(json)

    def _role(self, mount, name, json):
        if (mount, name) not in self.vault.roles:
            self.vault.add_role(name, mount=mount)
        self.vault.roles[(mount, name)].update(json or {})

    def _kv2_config(self, mount, json):
        if self.vault.answer_upgrading():
            raise hvac.exceptions.InvalidRequest(KV_UPGRADING)
        self.vault.kv2_config[mount].update(json or {})


class FakeClient:
    """What ``hvac.Client(...)`` returns here: the attributes the modules use."""

    def __init__(self, vault, token):
        self.vault = vault
        self.token = token
        self.sys = FakeSys(self)
        self.adapter = FakeAdapter(self)
        self.secrets = SimpleNamespace(kv=SimpleNamespace(v2=FakeKv2(self)))
        self.auth = SimpleNamespace(approle=FakeAppRole(self), token=FakeToken(self))
