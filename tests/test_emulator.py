"""The CaptchaAI emulator, exercised through real HTTP on 127.0.0.1 (free ports)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import secrets
import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from testkit.creds import new_key
from testkit.emulator import (
    COUNTER_NAMES,
    DelaySpec,
    EmulatorAdmin,
    EmulatorAdminError,
    EmulatorProcess,
)
from testkit.emulator.__main__ import main as emulator_main
from testkit.net import free_port

START_OPTIONS: dict[str, Any] = {
    "solve_delay": "fixed:0.3",
    "time_scale": 1.0,
    "ban_threshold": 5,
    "ban_window": 30.0,
    "ban_duration": 300.0,
    "price": 0.01,
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
RECAPTCHA = {"method": "userrecaptcha", "googlekey": "6Le-site-key", "pageurl": "https://a.test/"}


# ---------------------------------------------------------------------------
# fixtures and helpers (kept in this module on purpose)


class Public:
    """Minimal HTTP client of the public port (http.client: can pick a source address)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port = port
        self.source = source

    def call(
        self,
        endpoint: str,
        params: Mapping[str, str],
        *,
        method: str = "GET",
        upload: tuple[str, bytes] | None = None,
    ) -> tuple[int, str, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(self.source, 0)
        )
        try:
            path = f"/{endpoint}"
            if method == "GET":
                conn.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
            elif upload is not None:
                boundary = secrets.token_hex(8)
                body = b""
                for name, value in params.items():
                    body += (
                        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                        f"{value}\r\n"
                    ).encode()
                filename, data = upload
                body += (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                ).encode()
                body += data + f"\r\n--{boundary}--\r\n".encode()
                conn.request(
                    "POST",
                    path,
                    body=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                )
            else:
                conn.request(
                    "POST",
                    path,
                    body=urllib.parse.urlencode(params),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                )
            resp = conn.getresponse()
            return resp.status, resp.read().decode(), resp
        finally:
            conn.close()

    def text(self, endpoint: str, params: Mapping[str, str], **kw: Any) -> str:
        status, body, _ = self.call(endpoint, params, **kw)
        assert status == 200, body
        return body

    def json(self, endpoint: str, params: Mapping[str, str], **kw: Any) -> dict[str, Any]:
        body = self.text(endpoint, {**params, "json": "1"}, **kw)
        data: dict[str, Any] = json.loads(body)
        return data

    def submit(self, key: str, **params: str) -> str:
        body = self.text("in.php", {"key": key, **(params or RECAPTCHA)}, method="POST")
        assert body.startswith("OK|"), body
        return body[3:]

    def get(self, key: str, task_id: str) -> str:
        return self.text("res.php", {"key": key, "action": "get", "id": task_id}, method="POST")


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    # Free ports, never the molecule scenarios' 18350/18351: make test runs them side by side.
    with EmulatorProcess(free_port(), free_port(), log_level="DEBUG", **START_OPTIONS) as emu:
        yield emu


@pytest.fixture
def admin(emulator: EmulatorProcess) -> Iterator[EmulatorAdmin]:
    emulator.admin.reset()
    yield emulator.admin
    emulator.admin.reset()


@pytest.fixture
def api(emulator: EmulatorProcess, admin: EmulatorAdmin) -> Public:
    return Public(emulator.port)


@pytest.fixture
def key(admin: EmulatorAdmin) -> str:
    k = new_key()
    admin.add_key(k, balance=5.0)
    return k


def wait_ready(api: Public, key: str, task_id: str, limit: float = 10.0) -> str:
    deadline = time.monotonic() + limit
    while True:
        answer = api.get(key, task_id)
        if answer != "CAPCHA_NOT_READY" or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# in.php and res.php: every method, plain and JSON, GET and POST


@pytest.mark.parametrize(
    ("params", "prefix"),
    [
        (RECAPTCHA, "03A"),
        ({"method": "hcaptcha", "sitekey": "s", "pageurl": "https://a.test/"}, "P1_"),
        ({"method": "turnstile", "sitekey": "0x4AAA", "pageurl": "https://a.test/"}, "0."),
        ({"method": "base64", "body": base64.b64encode(PNG).decode()}, ""),
    ],
    ids=["userrecaptcha", "hcaptcha", "turnstile", "base64"],
)
@pytest.mark.parametrize("http_method", ["GET", "POST"])
def test_submit_and_solve_plain(
    api: Public, key: str, params: dict[str, str], prefix: str, http_method: str
) -> None:
    body = api.text("in.php", {"key": key, **params}, method=http_method)
    assert body.startswith("OK|")
    task_id = body[3:]
    assert task_id.isdigit()
    assert api.get(key, task_id) == "CAPCHA_NOT_READY"
    answer = wait_ready(api, key, task_id)
    assert answer.startswith("OK|" + prefix)
    assert len(answer) > 6
    # the answer stays readable
    assert api.get(key, task_id) == answer


def test_post_file_upload(api: Public, key: str) -> None:
    body = api.text("in.php", {"key": key, "method": "post"}, method="POST", upload=("c.png", PNG))
    assert body.startswith("OK|")
    answer = wait_ready(api, key, body[3:])
    assert answer.startswith("OK|")
    assert answer[3:].isalnum()


@pytest.mark.parametrize("http_method", ["GET", "POST"])
def test_json_answers(api: Public, key: str, http_method: str) -> None:
    sub = api.json("in.php", {"key": key, **RECAPTCHA}, method=http_method)
    assert sub["status"] == 1
    assert sub["request"].isdigit()
    params = {"key": key, "action": "get", "id": sub["request"]}
    assert api.json("res.php", params, method=http_method) == {
        "status": 0,
        "request": "CAPCHA_NOT_READY",
    }
    wait_ready(api, key, sub["request"])
    got = api.json("res.php", params, method=http_method)
    assert got["status"] == 1
    assert got["request"].startswith("03A")
    _, _, resp = api.call("res.php", {**params, "json": "1"}, method=http_method)
    assert resp.getheader("Content-Type", "").startswith("application/json")


def test_bulk_ids_plain_and_json(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(method_delays={"turnstile": "fixed:30"})
    fast = api.submit(key)
    slow = api.submit(key, method="turnstile", sitekey="s", pageurl="https://a.test/")
    other_key = new_key()
    admin.add_key(other_key)
    foreign = api.submit(other_key)
    wait_ready(api, key, fast)
    before = admin.counters(key)
    ids = f"{slow},{fast},999,{foreign},x1"
    plain = api.text("res.php", {"key": key, "action": "get", "ids": ids}, method="POST")
    items = plain.split("|")
    assert items[0] == "CAPCHA_NOT_READY"
    assert items[1].startswith("03A")  # bare answer, no OK| prefix
    assert items[2:] == [
        "ERROR_WRONG_CAPTCHA_ID",
        "ERROR_WRONG_CAPTCHA_ID",
        "ERROR_WRONG_ID_FORMAT",
    ]
    as_json = api.json("res.php", {"key": key, "action": "get", "ids": ids})
    assert as_json == {"status": 1, "request": plain}
    after = admin.counters(key)
    assert after["res_get"] - before["res_get"] == 2  # one request per bulk call
    assert after["res_get_ids"] - before["res_get_ids"] == 10


def test_max_bulk_ids(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(max_bulk_ids=2)
    a, b, c = (api.submit(key) for _ in range(3))
    ok = api.text("res.php", {"key": key, "action": "get", "ids": f"{a},{b}"})
    assert ok == "CAPCHA_NOT_READY|CAPCHA_NOT_READY"
    too_many = api.text("res.php", {"key": key, "action": "get", "ids": f"{a},{b},{c}"})
    assert too_many == "ERROR_BAD_PARAMETERS"


def test_getbalance_charges_and_refunds(api: Public, admin: EmulatorAdmin, key: str) -> None:
    assert api.text("res.php", {"key": key, "action": "getbalance"}) == "5.00000"
    api.submit(key)
    assert api.json("res.php", {"key": key, "action": "getbalance"}) == {
        "status": 1,
        "request": "4.99000",
    }
    admin.set_options(unsolvable_rate=1.0)
    task = api.submit(key)
    assert admin.counters(key)["balance"] == pytest.approx(4.98)
    assert wait_ready(api, key, task) == "ERROR_CAPTCHA_UNSOLVABLE"
    assert admin.counters(key)["balance"] == pytest.approx(4.99)  # unsolvable is not charged


def test_unsolvable_rate(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(unsolvable_rate=1.0)
    task = api.submit(key)
    assert wait_ready(api, key, task) == "ERROR_CAPTCHA_UNSOLVABLE"
    params = {"key": key, "action": "get", "id": task}
    assert api.json("res.php", params) == {"status": 0, "request": "ERROR_CAPTCHA_UNSOLVABLE"}
    counters = admin.counters(key)
    assert counters["unsolvable"] == 1
    assert counters["solved"] == 0


def test_reports(api: Public, key: str) -> None:
    task = api.submit(key)
    report = {"key": key, "action": "reportbad", "id": task}
    assert api.text("res.php", report) == "REPORT_NOT_RECORDED"  # not delivered yet
    wait_ready(api, key, task)
    assert api.text("res.php", report) == "OK_REPORT_RECORDED"
    assert api.text("res.php", report) == "ERROR_DUPLICATE_REPORT"
    task2 = api.submit(key)
    wait_ready(api, key, task2)
    good = {"key": key, "action": "reportgood", "id": task2}
    assert api.json("res.php", good) == {"status": 1, "request": "OK_REPORT_RECORDED"}
    assert api.text("res.php", {**good, "id": "12345"}) == "ERROR_WRONG_CAPTCHA_ID"


def test_header_acao(api: Public, key: str) -> None:
    _, _, resp = api.call("res.php", {"key": key, "action": "getbalance", "header_acao": "1"})
    assert resp.getheader("Access-Control-Allow-Origin") == "*"
    _, _, resp = api.call("res.php", {"key": key, "action": "getbalance"})
    assert resp.getheader("Access-Control-Allow-Origin") is None


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "bad_key",
    ["", "abc", new_key().upper(), new_key()[:31], "g" * 32],
    ids=["missing", "short", "uppercase", "31-chars", "not-hex"],
)
def test_malformed_key(api: Public, bad_key: str) -> None:
    params = {"key": bad_key, **RECAPTCHA} if bad_key else dict(RECAPTCHA)
    assert api.text("in.php", params) == "ERROR_WRONG_USER_KEY"
    res = {"key": bad_key, "action": "getbalance"}
    assert api.json("res.php", res) == {"status": 0, "request": "ERROR_WRONG_USER_KEY"}


def test_unknown_and_revoked_key(api: Public, admin: EmulatorAdmin, key: str) -> None:
    unknown = new_key()
    assert api.text("in.php", {"key": unknown, **RECAPTCHA}) == "ERROR_KEY_DOES_NOT_EXIST"
    task = api.submit(key)
    admin.revoke_key(key)
    assert api.text("in.php", {"key": key, **RECAPTCHA}) == "ERROR_KEY_DOES_NOT_EXIST"
    assert api.get(key, task) == "ERROR_KEY_DOES_NOT_EXIST"
    assert api.json("res.php", {"key": key, "action": "getbalance"}) == {
        "status": 0,
        "request": "ERROR_KEY_DOES_NOT_EXIST",
    }
    counters = admin.counters(key)
    assert counters["revoked"] is True
    assert counters["bad_key"] == 3
    assert admin.counters(unknown)["bad_key"] == 1
    assert admin.counters(unknown)["exists"] is False


def test_zero_balance(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_balance(key, 0.015)
    api.submit(key)
    assert api.text("in.php", {"key": key, **RECAPTCHA}) == "ERROR_ZERO_BALANCE"
    assert api.json("in.php", {"key": key, **RECAPTCHA}) == {
        "status": 0,
        "request": "ERROR_ZERO_BALANCE",
    }
    admin.set_balance(key, 1.0)
    api.submit(key)
    assert admin.counters(key)["zero_balance"] == 2


def test_no_slot_available(api: Public, admin: EmulatorAdmin) -> None:
    k = new_key()
    admin.add_key(k, balance=5.0, max_slots=2)
    first = api.submit(k)
    api.submit(k)
    assert api.text("in.php", {"key": k, **RECAPTCHA}) == "ERROR_NO_SLOT_AVAILABLE"
    assert admin.counters(k)["in_flight"] == 2
    wait_ready(api, k, first)  # ready tasks free their slot
    time.sleep(0.05)
    api.submit(k)
    admin.set_max_slots(k, 0)  # 0 = unlimited
    for _ in range(5):
        api.submit(k)
    counters = admin.counters(k)
    assert counters["no_slot"] == 1
    assert counters["submitted"] == 8


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"method": "userrecaptcha", "pageurl": "https://a.test/"}, "ERROR_GOOGLEKEY"),
        ({"method": "userrecaptcha", "googlekey": "k"}, "ERROR_PAGEURL"),
        ({"method": "hcaptcha", "pageurl": "https://a.test/"}, "ERROR_SITEKEY"),
        ({"method": "turnstile", "sitekey": "k"}, "ERROR_PAGEURL"),
        ({"method": "funcaptcha"}, "ERROR_BAD_PARAMETERS"),
        ({}, "ERROR_BAD_PARAMETERS"),
        ({"method": "base64", "body": "!!!not base64!!!"}, "ERROR_UPLOAD"),
        ({"method": "base64", "body": base64.b64encode(PNG[:50]).decode()}, "ERROR_ZERO_CAPTCHA_FILESIZE"),  # noqa: E501
        ({"method": "base64", "body": base64.b64encode(b"x" * 300).decode()}, "ERROR_IMAGE_TYPE_NOT_SUPPORTED"),  # noqa: E501
        ({"method": "base64", "body": base64.b64encode(PNG + b"\x00" * 1024 * 1024).decode()}, "ERROR_TOO_BIG_CAPTCHA_FILESIZE"),  # noqa: E501
        ({"method": "post"}, "ERROR_UPLOAD"),
    ],
)  # fmt: skip
def test_parameter_errors(api: Public, key: str, params: dict[str, str], code: str) -> None:
    assert api.text("in.php", {"key": key, **params}, method="POST") == code


def test_wrong_file_extension(api: Public, key: str) -> None:
    body = api.text("in.php", {"key": key, "method": "post"}, method="POST", upload=("c.bmp", PNG))
    assert body == "ERROR_WRONG_FILE_EXTENSION"


def test_res_php_id_and_action_errors(api: Public, admin: EmulatorAdmin, key: str) -> None:
    other = new_key()
    admin.add_key(other)
    foreign = api.submit(other)
    assert api.get(key, foreign) == "ERROR_WRONG_CAPTCHA_ID"  # another key's task
    assert api.get(key, "424242") == "ERROR_WRONG_CAPTCHA_ID"
    assert api.get(key, "12ab") == "ERROR_WRONG_ID_FORMAT"
    assert api.text("res.php", {"key": key}) == "ERROR_EMPTY_ACTION"
    assert api.text("res.php", {"key": key, "action": "nope"}) == "ERROR_EMPTY_ACTION"


def test_result_ttl_forgets_old_tasks(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(solve_delay="fixed:0", result_ttl=1.0)
    task = api.submit(key)
    assert api.get(key, task).startswith("OK|")
    time.sleep(1.2)
    assert api.get(key, task) == "ERROR_WRONG_CAPTCHA_ID"


# ---------------------------------------------------------------------------
# IP ban


def loopback_alias_usable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 2, ("127.0.0.2", 0)):
            return True
    except OSError:
        return False


def test_ip_ban_after_bad_key_requests(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(ban_threshold=3, ban_window=30.0, ban_duration=300.0)
    bad = new_key()
    assert api.text("in.php", {"key": bad, **RECAPTCHA}) == "ERROR_KEY_DOES_NOT_EXIST"
    assert api.text("res.php", {"key": "x", "action": "getbalance"}) == "ERROR_WRONG_USER_KEY"
    assert admin.bans() == {}
    assert api.text("in.php", {"key": bad, **RECAPTCHA}) == "ERROR_KEY_DOES_NOT_EXIST"
    # three bad-key requests: the address is banned, even for a good key
    assert api.text("in.php", {"key": key, **RECAPTCHA}) == "IP_BANNED"
    assert api.json("res.php", {"key": key, "action": "getbalance"}) == {
        "status": 0,
        "request": "IP_BANNED",
    }
    assert list(admin.bans()) == ["127.0.0.1"]
    counters = admin.counters(key)
    assert counters["ip_banned"] == 2
    assert counters["submitted"] == 0
    assert admin.all_counters()["global"]["bans"] == 1
    # another source address is not banned
    assert loopback_alias_usable(api.port), "127.0.0.2 must be usable as a source address"
    assert Public(api.port, source="127.0.0.2").submit(key).isdigit()


def test_ip_ban_lifts_after_duration(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(ban_threshold=2, ban_duration=1.0)
    for _ in range(2):
        api.text("in.php", {"key": "bad", **RECAPTCHA})
    assert api.text("in.php", {"key": key, **RECAPTCHA}) == "IP_BANNED"
    time.sleep(1.1)
    assert api.submit(key).isdigit()
    assert admin.bans() == {}


def test_bad_keys_outside_window_do_not_ban(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(ban_threshold=3, ban_window=1.0)
    for _ in range(2):
        api.text("in.php", {"key": "bad", **RECAPTCHA})
    time.sleep(1.2)
    for _ in range(2):
        api.text("in.php", {"key": "bad", **RECAPTCHA})
    assert api.submit(key).isdigit()
    api.text("in.php", {"key": "bad", **RECAPTCHA})  # third within the window
    assert api.text("in.php", {"key": key, **RECAPTCHA}) == "IP_BANNED"


# ---------------------------------------------------------------------------
# counters, options, faults, reset


def test_counters_count_each_request(api: Public, admin: EmulatorAdmin, key: str) -> None:
    t1 = api.submit(key)
    t2 = api.submit(key)
    api.text("res.php", {"key": key, "action": "getbalance"})
    api.get(key, t1)  # not ready
    wait_ready(api, key, t1)
    wait_ready(api, key, t2)
    api.text("res.php", {"key": key, "action": "get", "ids": f"{t1},{t2}"})
    api.text("res.php", {"key": key, "action": "reportgood", "id": t1})
    c = admin.counters(key)
    assert set(COUNTER_NAMES) <= set(c)
    assert c["in_php"] == 2
    assert c["submitted"] == 2
    assert c["getbalance"] == 1
    assert c["reportgood"] == 1
    assert c["solved"] == 2  # each task counted once, however often it is read
    assert c["res_php"] == 1 + c["res_get"] + 1
    assert c["res_get_ids"] == c["res_get"] + 1  # the bulk call asked for two ids
    assert c["not_ready"] >= 1
    assert c["fingerprint"] == "***" + key[-4:]
    assert c["in_flight"] == 0
    listed = admin.all_counters()
    assert [k["fingerprint"] for k in listed["keys"]] == ["***" + key[-4:]]
    assert key not in json.dumps(listed)


def test_tasks_report_timings(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(solve_delay="fixed:4", time_scale=0.05)
    task = api.submit(key)
    wait_ready(api, key, task)
    (row,) = admin.tasks(key)
    assert row["id"] == int(task)
    assert row["nominal_delay"] == 4.0
    assert row["delay"] == pytest.approx(0.2)
    assert row["delivered_after"] >= row["delay"]
    assert row["added_latency"] == pytest.approx(row["delivered_after"] - row["delay"])
    assert row["polls"] >= 2


def test_seed_makes_delays_reproducible(api: Public, admin: EmulatorAdmin) -> None:
    runs: list[list[float]] = []
    for _ in range(2):
        admin.reset()
        admin.set_options(solve_delay="uniform:1:30", time_scale=0.001, seed=42)
        k = new_key()
        admin.add_key(k)
        ids = [api.submit(k) for _ in range(5)]
        rows = {str(r["id"]): r["nominal_delay"] for r in admin.tasks(k)}
        runs.append([rows[i] for i in ids])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 5


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fixed:2", "fixed:2"),
        ("2.5", "fixed:2.5"),
        ("uniform:1:3", "uniform:1:3"),
        ("normal:15:5", "normal:15:5"),
        ("exp:4", "exp:4"),
    ],
)
def test_delay_spec_parse(spec: str, expected: str) -> None:
    assert str(DelaySpec.parse(spec)) == expected


@pytest.mark.parametrize("spec", ["", "gamma:1", "uniform:3:1", "fixed:-1", "normal:1", "fixed:x"])
def test_delay_spec_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="spec"):
        DelaySpec.parse(spec)


def test_set_options_validates(admin: EmulatorAdmin) -> None:
    with pytest.raises(EmulatorAdminError, match="unknown option"):
        admin.set_options(no_such_option=1)
    with pytest.raises(EmulatorAdminError, match="spec"):
        admin.set_options(solve_delay="sometimes")
    with pytest.raises(EmulatorAdminError, match="unsolvable_rate"):
        admin.set_options(unsolvable_rate=2)
    current = admin.set_options(solve_delay="uniform:1:3", time_scale=0.1)
    assert current["solve_delay"] == "uniform:1:3"
    assert admin.options()["time_scale"] == 0.1


def test_add_key_validates(admin: EmulatorAdmin) -> None:
    with pytest.raises(EmulatorAdminError, match="32 lowercase hex"):
        admin.add_key("ABC")
    with pytest.raises(EmulatorAdminError) as err:
        admin.revoke_key(new_key())
    assert err.value.status == 404


def test_injected_faults(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.inject("ERROR_NO_SLOT_AVAILABLE", endpoint="in.php", count=2)
    assert api.text("in.php", {"key": key, **RECAPTCHA}) == "ERROR_NO_SLOT_AVAILABLE"
    assert api.json("in.php", {"key": key, **RECAPTCHA}) == {
        "status": 0,
        "request": "ERROR_NO_SLOT_AVAILABLE",
    }
    task = api.submit(key)
    admin.inject(endpoint="res.php", http_status=502)
    status, body, _ = api.call("res.php", {"key": key, "action": "get", "id": task})
    assert status == 502
    assert "<html>" in body
    assert api.get(key, task) == "CAPCHA_NOT_READY"
    admin.set_options(http_error_rate=1.0)
    assert api.call("res.php", {"key": key, "action": "getbalance"})[0] == 500
    assert admin.counters(key)["injected"] == 3


def test_reset_forgets_everything(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_options(ban_threshold=1, solve_delay="fixed:9")
    task = api.submit(key)
    api.text("in.php", {"key": "bad", **RECAPTCHA})
    assert admin.bans()
    admin.reset()
    assert admin.bans() == {}
    assert admin.options()["solve_delay"] == START_OPTIONS["solve_delay"]
    assert admin.options()["ban_threshold"] == START_OPTIONS["ban_threshold"]
    assert api.get(key, task) == "ERROR_KEY_DOES_NOT_EXIST"  # the key is gone too
    admin.add_key(key)
    assert api.get(key, task) == "ERROR_WRONG_CAPTCHA_ID"  # and its tasks
    counters = admin.counters(key)
    assert counters["in_php"] == 0
    assert counters["res_php"] == 2  # both polls after the reset
    assert counters["bad_key"] == 1


def test_many_tasks_in_flight(api: Public, admin: EmulatorAdmin, key: str) -> None:
    admin.set_balance(key, 100.0)
    admin.set_options(solve_delay="fixed:600")
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
    ids = []
    for _ in range(600):
        conn.request(
            "POST",
            "/in.php",
            body=urllib.parse.urlencode({"key": key, **RECAPTCHA}),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        body = conn.getresponse().read().decode()
        assert body.startswith("OK|")
        ids.append(body[3:])
    conn.close()
    assert len(set(ids)) == 600
    assert admin.counters(key)["in_flight"] == 600
    bulk = api.text("res.php", {"key": key, "action": "get", "ids": ",".join(ids)}, method="POST")
    assert bulk.split("|") == ["CAPCHA_NOT_READY"] * 600


def test_keys_never_logged_in_full(
    emulator: EmulatorProcess, api: Public, admin: EmulatorAdmin, key: str
) -> None:
    admin.set_options(ban_threshold=2)
    revoked = new_key()
    admin.add_key(revoked)
    admin.revoke_key(revoked)
    task = api.submit(key)
    api.get(key, task)
    api.text("in.php", {"key": revoked, **RECAPTCHA})
    api.text("in.php", {"key": revoked, **RECAPTCHA})  # ban
    time.sleep(0.1)
    log = emulator.log_text()
    assert "***" + key[-4:] in log  # it does log about the keys, masked
    assert "***" + revoked[-4:] in log
    assert "banned" in log
    for secret in (key, revoked):
        assert secret not in log
        assert secret[:-4] not in log


# ---------------------------------------------------------------------------
# process management and CLI


def test_process_refuses_a_busy_admin_port(emulator: EmulatorProcess) -> None:
    with pytest.raises(RuntimeError, match="already answers"):
        EmulatorProcess(emulator.port, emulator.admin_port).start()


def test_process_reports_start_failure(emulator: EmulatorProcess) -> None:
    # public port taken by the running emulator, admin port free: the child exits
    with pytest.raises(RuntimeError, match="exited during start-up"):
        EmulatorProcess(emulator.port, free_port(), startup_timeout=10).start()


def test_process_validates_options_before_start() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        EmulatorProcess(free_port(), free_port(), bogus=1)


def test_cli_refuses_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert emulator_main(["--host", "0.0.0.0", "--port", "18359"]) == 2  # noqa: S104
    assert "loopback" in capsys.readouterr().err


def test_cli_rejects_bad_delay(capsys: pytest.CaptureFixture[str]) -> None:
    assert emulator_main(["--solve-delay", "whenever", "--port", "18359"]) == 2
    assert "solve-delay" in capsys.readouterr().err


def test_in_process_server_on_free_ports() -> None:
    """``EmulatorServer`` runs both ports inside the caller's loop (port 0 = any free port)."""
    from testkit.emulator import EmulatorServer, Options

    async def scenario() -> tuple[str, str, dict[str, Any]]:
        options = Options(solve_delay="fixed:0", seed=7)
        async with EmulatorServer(0, 0, options) as srv:
            assert srv.port != srv.admin_port
            k = new_key()
            srv.emulator.add_key(k)
            api = Public(srv.port)
            loop = asyncio.get_running_loop()
            task = await loop.run_in_executor(None, lambda: api.submit(k))
            answer = await loop.run_in_executor(None, lambda: api.get(k, task))
            admin = EmulatorAdmin(srv.admin_url)
            counters = await loop.run_in_executor(None, lambda: admin.counters(k))
            return task, answer, counters

    task, answer, counters = asyncio.run(scenario())
    assert task.isdigit()
    assert answer.startswith("OK|03A")
    assert counters["solved"] == 1
