# Copyright: captcha key vault kit contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""module_utils/vault_client.py: connection errors, error mapping, module helpers
and the retrying adapter (against a fake HTTP session; tests/faults runs it on a real OpenBao)."""

from __future__ import annotations

import json
import secrets

import hvac
import hvac.exceptions
import pytest
import requests
from ansible.module_utils import basic
from ansible.module_utils.testing import patch_module_args
from ansible_collections.captcha_kit.vault.plugins.module_utils import vault_client
from ansible_collections.captcha_kit.vault.tests.unit.plugins.modules.vault_fakes import (
    FakeVault,
)

URL = "https://vault.test:8200"


class Failed(Exception):
    """``fail_json`` of ``FakeModule``."""


class FakeModule:
    """What the helpers use of an ``AnsibleModule``: params, check/diff mode, fail_json."""

    def __init__(self, check_mode=False, diff=False, **params):
        self.params = {
            "url": URL,
            "ca_cert": None,
            "token": secrets.token_hex(16),
            "timeout": 30,
            "urls": None,
            "retry_timeout": None,
            **params,
        }
        self.check_mode = check_mode
        self._diff = diff

    def fail_json(self, msg, **kwargs):
        raise Failed(msg)


@pytest.fixture(autouse=True)
def no_extra_addresses(monkeypatch):
    monkeypatch.delenv("CAPTCHA_KIT_VAULT_ADDRS", raising=False)


@pytest.fixture
def vault(monkeypatch):
    fake = FakeVault()
    monkeypatch.setattr(hvac, "Client", fake.client)
    return fake


# ------------------------------------------------------------------ options and addresses


def test_the_connection_options_are_merged_with_the_module_options():
    spec = vault_client.vault_argument_spec(path={"type": "str", "required": True})
    assert set(spec) == {"url", "ca_cert", "token", "timeout", "urls", "retry_timeout", "path"}
    assert spec["token"]["no_log"] is True
    assert spec["url"]["fallback"][1] == ["VAULT_ADDR"]


def test_addresses_come_from_url_urls_and_the_environment_without_repeats(monkeypatch):
    monkeypatch.setenv("CAPTCHA_KIT_VAULT_ADDRS", "https://c:8200, https://a:8200/")
    params = {"url": "https://a:8200/,https://b:8200", "urls": ["https://b:8200", "https://d:8200"]}
    assert vault_client.node_addresses(params) == [
        "https://a:8200",
        "https://b:8200",
        "https://d:8200",
        "https://c:8200",
    ]


# ------------------------------------------------------------------ get_client


def test_a_client_is_built_for_the_first_address_with_the_others_as_fallbacks(vault, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    module = FakeModule(
        url=f"{URL},https://vault-2.test:8200", token=vault.token, ca_cert=str(ca), timeout=5
    )
    client = vault_client.get_client(module)
    assert client.token == vault.token
    [built] = vault.clients
    assert built["url"] == URL
    assert built["verify"] == str(ca)
    assert built["timeout"] == 5
    assert built["adapter"] is vault_client.RetryingAdapter
    assert built["addrs"] == ["https://vault-2.test:8200"]
    assert built["retry_timeout"] == vault_client.DEFAULT_RETRY_TIMEOUT
    assert vault.calls == ["token.lookup_self"]


def test_without_a_ca_file_the_system_cas_are_used_and_the_token_check_can_be_skipped(vault):
    vault_client.get_client(FakeModule(token=vault.token, retry_timeout=2.5), check_token=False)
    assert vault.clients[0]["verify"] is True
    assert vault.clients[0]["retry_timeout"] == 2.5
    assert vault.calls == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"url": None}, "No Vault address: set VAULT_ADDR in the environment or the url option"),
        ({"ca_cert": "/nonexistent/ca.pem"}, "CA file /nonexistent/ca.pem does not exist"),
        (
            {"token": None},
            "No Vault token: export VAULT_TOKEN (the token each playbook needs is in docs/",
        ),
    ],
)
def test_missing_connection_settings_fail_before_connecting(vault, params, message):
    with pytest.raises(Failed) as failed:
        vault_client.get_client(FakeModule(**params))
    assert str(failed.value).startswith(message)
    assert vault.clients == []


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (hvac.exceptions.Forbidden("permission denied"), "The Vault token in VAULT_TOKEN / token"),
        (hvac.exceptions.VaultDown("sealed"), f"Vault at {URL} is sealed or down: unseal it first"),
        (hvac.exceptions.InternalServerError("boom"), f"Vault at {URL} refused the token lookup"),
        (
            requests.exceptions.ConnectionError("refused"),
            f"Cannot reach Vault at {URL} (also tried https://b:8200): is the server running",
        ),
        (
            requests.exceptions.SSLError("certificate verify failed"),
            f"TLS verification of {URL} failed with CA file (system CAs)",
        ),
    ],
)
def test_a_failed_token_lookup_says_what_to_fix(vault, exc, message):
    vault.fail("token.lookup_self", exc)
    module = FakeModule(token=vault.token, urls=["https://b:8200"])
    with pytest.raises(Failed) as failed:
        vault_client.get_client(module)
    assert str(failed.value).startswith(message)
    assert vault.token not in str(failed.value)


def test_an_unexpected_error_of_the_lookup_is_not_hidden(vault):
    vault.fail("token.lookup_self", KeyError("bug"))
    with pytest.raises(KeyError):
        vault_client.get_client(FakeModule(token=vault.token))


def test_without_hvac_the_module_says_which_library_is_missing(monkeypatch):
    monkeypatch.setattr(vault_client, "HVAC_IMPORT_ERROR", "Traceback: no hvac")
    with pytest.raises(Failed) as failed:
        vault_client.get_client(FakeModule())
    assert "hvac" in str(failed.value)


# ------------------------------------------------------------------ vault_call


def _raise(exc):
    raise exc


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            hvac.exceptions.Forbidden("permission denied"),
            "Permission denied to read policy p: the token lacks the rights (the token each "
            "playbook needs is in docs/tokens.md: policies/captcha-provisioner.hcl to provision, "
            "captcha-deployer-<env> to deploy workers, the rotator AppRole to rotate); Vault "
            "said: permission denied",
        ),
        (hvac.exceptions.VaultDown("sealed"), "Cannot read policy p: Vault is sealed or down"),
        (hvac.exceptions.InvalidRequest("bad"), "Cannot read policy p: Vault said: bad"),
        (
            requests.exceptions.ConnectionError("refused"),
            f"Cannot read policy p: Cannot reach Vault at {URL}",
        ),
    ],
)
def test_vault_errors_become_messages_naming_the_action(exc, message):
    with pytest.raises(Failed) as failed:
        vault_client.vault_call(FakeModule(), "read policy p", _raise, exc)
    assert str(failed.value).startswith(message)


def test_not_found_is_raised_for_the_caller_to_treat_as_absent():
    with pytest.raises(vault_client.VaultNotFound):
        vault_client.vault_call(FakeModule(), "read", _raise, hvac.exceptions.InvalidPath("404"))


def test_other_errors_are_not_hidden():
    with pytest.raises(ZeroDivisionError):
        vault_client.vault_call(FakeModule(), "divide", lambda: 1 / 0)


def test_a_successful_call_returns_its_answer():
    assert vault_client.vault_call(FakeModule(), "add", lambda a, b=0: a + b, 1, b=2) == 3


def _replaying(answers):
    """A Vault call that gives the next of ``answers`` each time (an exception is raised)."""

    def call():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return call


def test_a_kv_mount_still_upgrading_is_waited_out(monkeypatch):
    monkeypatch.setattr(vault_client.time, "sleep", lambda seconds: None)
    answers = [
        {"warnings": [vault_client.KV_UPGRADING_MARK + " ..."]},
        hvac.exceptions.InvalidRequest(vault_client.KV_UPGRADING_MARK),
        {"data": {"ok": True}},
    ]
    read = _replaying(answers)
    assert vault_client.vault_call_when_ready(FakeModule(), "read", read) == {"data": {"ok": True}}
    assert answers == []


@pytest.mark.parametrize(
    "message",
    [
        # The active node, and a standby that answers reads (OpenBao 2.7's words).
        "Upgrading from non-versioned to versioned data. This backend will be unavailable for a "
        "brief period and will resume service shortly.",
        "Waiting for the primary to upgrade from non-versioned to versioned data. This backend "
        "will be unavailable for a brief period and will resume service when the primary is "
        "finished.",
    ],
    ids=["active node", "standby"],
)
def test_both_words_of_an_upgrading_kv_mount_are_waited_out(monkeypatch, message):
    monkeypatch.setattr(vault_client.time, "sleep", lambda seconds: None)
    # Twice: after any other error vault_call_when_ready makes one last plain call.
    answers = [hvac.exceptions.InvalidRequest(message)] * 2 + [{"data": {"ok": True}}]
    read = _replaying(answers)
    assert vault_client.vault_call_when_ready(FakeModule(), "read", read) == {"data": {"ok": True}}
    assert answers == []


def test_waiting_for_the_upgrade_does_not_hide_other_errors(monkeypatch):
    monkeypatch.setattr(vault_client.time, "sleep", lambda seconds: pytest.fail("slept"))
    with pytest.raises(Failed, match=r"^Cannot read: Vault said: bad"):
        vault_client.vault_call_when_ready(
            FakeModule(), "read", _raise, hvac.exceptions.InvalidRequest("bad")
        )
    with pytest.raises(vault_client.VaultNotFound):
        vault_client.vault_call_when_ready(
            FakeModule(), "read", _raise, hvac.exceptions.InvalidPath("404")
        )


# ------------------------------------------------------------------ module helpers


def test_run_module_exits_with_what_the_handler_returns(monkeypatch):
    seen = {}

    def handler(module):
        seen.update(check_mode=module.check_mode, name=module.params["name"])
        return {"changed": True, "name": module.params["name"]}

    def exit_json(module, **result):
        seen["result"] = result
        raise SystemExit(0)

    monkeypatch.setattr(basic.AnsibleModule, "exit_json", exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "_log_invocation", lambda module: None)
    args = {"name": "x", "_ansible_check_mode": True}
    with patch_module_args(args), pytest.raises(SystemExit):
        vault_client.run_module({"name": {"type": "str", "required": True}}, handler)
    assert seen == {"check_mode": True, "name": "x", "result": {"changed": True, "name": "x"}}


def test_duration_or_fail_names_the_option():
    assert vault_client.duration_or_fail(FakeModule(), "wrap_ttl", "2m") == 120
    with pytest.raises(Failed, match=r"^wrap_ttl: not a duration: 'later'"):
        vault_client.duration_or_fail(FakeModule(), "wrap_ttl", "later")


def test_batch_items_take_one_item_or_the_list():
    one = FakeModule(name="a", rules="r", many=None)
    assert vault_client.batch_items(one, "many", ("rules",)) == (
        False,
        [{"name": "a", "rules": "r"}],
    )
    many = FakeModule(name=None, rules=None, many=[{"name": "a"}, {"name": "b"}])
    assert vault_client.batch_items(many, "many", ("rules",)) == (
        True,
        [{"name": "a"}, {"name": "b"}],
    )


def test_batch_items_refuse_repeated_names():
    module = FakeModule(many=[{"name": "b"}, {"name": "a"}, {"name": "b"}, {"name": "a"}])
    with pytest.raises(Failed, match=r"^many: each name once; repeated: a, b$"):
        vault_client.batch_items(module, "many", ())


def _results():
    return [
        {"name": "a", "changed": False, "diff": {"before": "x", "after": "x"}},
        {"name": "b", "changed": True, "diff": {"before": "x", "after": "y"}},
    ]


def test_a_batch_result_lists_each_item_and_diffs_the_changed_ones():
    result = vault_client.batch_result(FakeModule(diff=True), "many", True, _results())
    assert result == {
        "changed": True,
        "many": [{"name": "a", "changed": False}, {"name": "b", "changed": True}],
        "diff": [{"before": "x", "after": "y"}],
    }


def test_a_single_result_is_the_item_with_its_diff_even_unchanged():
    [first, _] = _results()
    result = vault_client.batch_result(FakeModule(diff=True), "many", False, [first])
    assert result == {"name": "a", "changed": False, "diff": {"before": "x", "after": "x"}}
    result = vault_client.batch_result(FakeModule(diff=False), "many", False, _results()[:1])
    assert "diff" not in result


# ------------------------------------------------------------------ RetryingAdapter


def _response(status, body=None):
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body if body is not None else {}).encode()
    response.headers["Content-Type"] = "application/json"
    return response


class FakeSession(requests.Session):
    """Answers per address, in order; an exception in the list is raised. Sends nothing."""

    def __init__(self, answers):
        super().__init__()
        self.answers = {addr: list(items) for addr, items in answers.items()}
        self.sent = []
        self.headers = []

    def request(self, method, url, headers=None, allow_redirects=True, **kwargs):
        addr = url.split("/v1/")[0]
        self.sent.append((method, addr))
        self.headers.append(dict(headers or {}))
        answer = self.answers[addr].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _adapter(session, addrs, **opts):
    sleeps = []
    adapter = vault_client.RetryingAdapter(
        base_uri=addrs[0],
        token=secrets.token_hex(8),
        session=session,
        addrs=addrs[1:],
        sleep=sleeps.append,
        **opts,
    )
    return adapter, sleeps


A, B = "https://a:8200", "https://b:8200"
OK = {"data": {"ok": True}}


def test_a_refused_address_moves_on_to_the_next_which_is_kept():
    session = FakeSession(
        {A: [requests.exceptions.ConnectionError("refused")], B: [_response(200, OK)] * 2}
    )
    adapter, sleeps = _adapter(session, [A, B])
    assert adapter.get("/v1/sys/health") == OK
    assert adapter.get("/v1/sys/health") == OK
    assert session.sent == [("get", A), ("get", B), ("get", B)]
    assert (adapter.retries, sleeps) == (1, [])


def test_a_standby_without_an_active_node_is_retried_on_the_next_address():
    standby = _response(
        500, {"errors": ["local node not active but active cluster node not found"]}
    )
    session = FakeSession({A: [standby], B: [_response(200, OK)]})
    adapter, _ = _adapter(session, [A, B])
    assert adapter.post("/v1/secret/config", json={}) == OK
    assert adapter.retries == 1


def test_client_errors_are_never_retried():
    session = FakeSession({A: [_response(400, {"errors": ["bad"]})], B: []})
    adapter, sleeps = _adapter(session, [A, B])
    with pytest.raises(hvac.exceptions.InvalidRequest):
        adapter.get("/v1/sys/policy/x")
    assert session.sent == [("get", A)]
    assert (adapter.retries, sleeps) == (0, [])


def test_tls_errors_are_never_retried():
    session = FakeSession({A: [requests.exceptions.SSLError("unknown CA")], B: []})
    adapter, _ = _adapter(session, [A, B])
    with pytest.raises(requests.exceptions.SSLError):
        adapter.get("/v1/sys/health")
    assert adapter.retries == 0


def test_a_read_timeout_on_a_write_is_not_sent_twice():
    session = FakeSession({A: [requests.exceptions.ReadTimeout("slow")], B: []})
    adapter, _ = _adapter(session, [A, B])
    with pytest.raises(requests.exceptions.ReadTimeout):
        adapter.post("/v1/secret/data/x", json={})
    assert session.sent == [("post", A)]


def test_a_single_sealed_address_gives_up_within_the_unreachable_budget():
    sealed = _response(503, {"errors": ["Vault is sealed"]})
    session = FakeSession({A: [sealed] * 50})
    adapter, sleeps = _adapter(session, [A], retry_timeout=30)
    with pytest.raises(hvac.exceptions.VaultDown):
        adapter.get("/v1/sys/health")
    assert sleeps, "it waits between rounds"
    assert max(sleeps) <= 2.0
    assert sum(sleeps) <= vault_client.UNREACHABLE_TIMEOUT


INDEX = "eyJjbHVzdGVyIjoiYyIsInZhbHVlIjoiMzgifQ"  # what OpenBao sends: opaque, not a secret


def _written(index=INDEX):
    response = _response(204)
    response.headers["X-Vault-Index"] = index
    return response


def test_after_a_write_each_request_asks_for_that_write_to_be_seen():
    """Read-your-writes on a cluster whose standbys answer reads: the index of the last write
    goes with every later request, and a standby that has not applied it forwards the request
    to the active node (OpenBao 2.7: X-Vault-Index, X-Vault-Inconsistent)."""
    session = FakeSession({A: [_response(200, OK), _written(), _response(200, OK)]})
    adapter, _ = _adapter(session, [A])
    adapter.get("/v1/sys/policy/x")
    adapter.post("/v1/sys/policy/x", json={})
    adapter.get("/v1/sys/policy/x")
    first, write, read = session.headers
    assert "X-Vault-Index" not in first
    assert "X-Vault-Inconsistent" not in first
    assert "X-Vault-Index" not in write
    assert read["X-Vault-Index"] == INDEX
    assert read["X-Vault-Inconsistent"] == "forward-active-node"


def test_the_latest_write_index_is_the_one_sent():
    later = "eyJjbHVzdGVyIjoiYyIsInZhbHVlIjoiMzkifQ"
    session = FakeSession({A: [_written(), _written(later), _response(200, OK)]})
    adapter, _ = _adapter(session, [A])
    adapter.post("/v1/a", json={})
    adapter.post("/v1/b", json={})
    adapter.get("/v1/b")
    assert session.headers[1]["X-Vault-Index"] == INDEX
    assert session.headers[2]["X-Vault-Index"] == later


def test_a_node_not_yet_at_the_index_is_asked_again():
    """A node that cannot forward answers 429 (OpenBao) or 412 (Vault) while the write is not
    applied there: the request is retried until it is, never answered from the stale copy."""
    not_yet = _response(429, {"errors": []})
    session = FakeSession({A: [_written(), not_yet, _response(200, OK)]})
    adapter, sleeps = _adapter(session, [A])
    adapter.post("/v1/sys/policy/x", json={})
    assert adapter.get("/v1/sys/policy/x") == OK
    assert (adapter.retries, len(sleeps)) == (1, 1)


def test_a_429_without_an_index_is_not_retried():
    session = FakeSession({A: [_response(429, {"errors": ["rate limit quota exceeded"]})]})
    adapter, sleeps = _adapter(session, [A])
    with pytest.raises(hvac.exceptions.RateLimitExceeded):
        adapter.get("/v1/sys/policy/x")
    assert (adapter.retries, sleeps) == (0, [])
