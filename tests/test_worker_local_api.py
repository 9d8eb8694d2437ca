"""captcha_worker with the local API limited to chosen clients (issue 12, point 5: "/solve
answers any local process, including a browser page"): the worker also listens on a unix socket
that only the client group reaches, and /solve requires a bearer token that the role made on the
host, readable by root and that group only.

One worker host, deployed by the kit's own playbook with ``captcha_worker_unix_socket``,
``captcha_worker_client_group`` and ``captcha_worker_api_token``. Inside the host a member of the
client group and a user outside it act through a small client (the system Python, run with
``runuser``) that reads the token file itself: no token on any command line.

* the member solves over the socket and over TCP with the token (200, through the emulator);
* without the token, with a wrong one, or with another scheme: 401 on both, with
  ``WWW-Authenticate: Bearer``; /healthz and /metrics stay open;
* the outsider can neither connect to the socket nor read the token (permission denied), and
  over TCP it gets 401;
* files and unit: socket 0660 and directory 2750 of the client group, token 0640
  root:<group> in a 0750 directory, SupplementaryGroups in the unit;
* a second run reports changed=0 and keeps the token (its sha256 compared, never shown), and
  so does a ``--check --diff`` run;
* no token, key, role-id or secret-id in any playbook output, the journal, /healthz or /metrics.

Real parts: a systemd container of the kit's host image reached over SSH as `deploy` with become
(testkit/worker_hosts.py), the test OpenBao, the CaptchaAI emulator on free ports (the
containers share the host network), ansible-playbook with playbooks/deploy-workers.yml.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from testkit.creds import assert_no_secrets
from testkit.hosts import CONTAINERS_CONF
from testkit.playbook import PlaybookResult, run_playbook
from testkit.worker_hosts import PLAYBOOK, Deployment, Host, deploy, emulated_env

pytestmark = pytest.mark.containers

SOCKET = "/run/captcha-solver/solve.sock"
CLIENT_DIR = "/etc/captcha-solver-client"
TOKEN_FILE = f"{CLIENT_DIR}/api-token"
GROUP = "scrapers"
MEMBER = "scraper"
OUTSIDER = "outsider"
CLIENT = "/usr/local/bin/kit-api-client"

# The client the users run on the host: one request, one JSON line about the answer. It reads
# the token from the file itself (as the user it runs as) and prints only statuses and bodies.
CLIENT_SOURCE = r"""#!/usr/bin/python3
import http.client, json, secrets, socket, sys

via, path, auth = sys.argv[1:4]


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path):
        super().__init__("localhost", timeout=60)
        self.socket_path = socket_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.socket_path)


def fail(stage, exc):
    print(json.dumps({"stage": stage, "error": type(exc).__name__, "errno": exc.errno}))
    sys.exit(0)


headers = {}
if auth == "file":
    try:
        with open(sys.argv[4]) as fh:
            headers["Authorization"] = "Bearer " + fh.read().strip()
    except OSError as exc:
        fail("token", exc)
elif auth == "wrong":
    headers["Authorization"] = "Bearer " + secrets.token_urlsafe(32)
elif auth == "basic-file":
    with open(sys.argv[4]) as fh:
        headers["Authorization"] = "Basic " + fh.read().strip()
method, body = "GET", None
if path == "/solve":
    method = "POST"
    body = json.dumps({"method": "userrecaptcha", "googlekey": "g", "pageurl": "https://example.test/"})
    headers["Content-Type"] = "application/json"
if via == "unix":
    conn = UnixConnection(sys.argv[5] if len(sys.argv) > 5 else "/run/captcha-solver/solve.sock")
else:
    conn = http.client.HTTPConnection("127.0.0.1", int(via), timeout=60)
try:
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
except OSError as exc:
    fail("connect", exc)
text = response.read().decode()
try:
    doc = json.loads(text)
except ValueError:
    doc = None
print(json.dumps({
    "status": response.status,
    "www_authenticate": response.getheader("WWW-Authenticate"),
    "body": doc,
    "text": text,
}))
"""


@dataclass
class Deployed:
    """The deployed host, its inventory, the env's key, the worker's TCP port, the extra vars
    of every run and each run's result (for the leak check at the end)."""

    host: Host
    deployment: Deployment
    key: str
    port: int
    extra: dict[str, Any]
    runs: list[PlaybookResult] = field(default_factory=list)


def _worker_port(deployment: Deployment, host: Host) -> int:
    data = yaml.safe_load(deployment.inventory.read_text())
    return int(data["all"]["children"]["workers"]["hosts"][host.name]["captcha_worker_port"])


@pytest.fixture(scope="module")
def deployed(vault, tmp_path_factory) -> Iterator[Deployed]:
    """A fresh host deployed once with the socket and the token on, against an emulator of its
    own that knows the env's key; a member of the client group and an outsider on it."""
    with emulated_env(vault, "kit-local-api", tmp_path_factory.mktemp("local-api")) as env:
        (host,), deployment = env.hosts, env.deployment
        extra = {
            "captcha_worker_unix_socket": SOCKET,
            "captcha_worker_client_group": GROUP,
            "captcha_worker_api_token": True,
        }
        made = Deployed(host, deployment, env.key, _worker_port(deployment, host), extra)
        first = deploy(vault, deployment, **made.extra)
        made.runs.append(first)
        assert first.rc == 0, first.failure_messages(host.name)[-3000:]
        print(f"\nfirst deploy with the socket and the token: {first.seconds:.1f} s")
        host.sh(
            f"useradd --system --no-create-home --shell /usr/sbin/nologin -G {GROUP} {MEMBER}"
            f" && useradd --system --no-create-home --shell /usr/sbin/nologin {OUTSIDER}"
            f" && cat > {CLIENT} <<'EOF'\n{CLIENT_SOURCE}EOF\nchmod 0755 {CLIENT}"
        )
        yield made


def _as(deployed: Deployed, user: str, via: str, path: str, auth: str) -> dict[str, Any]:
    """One request from ``user`` on the host (``via``: "unix" or "tcp")."""
    target = "unix" if via == "unix" else str(deployed.port)
    out = deployed.host.sh(
        f"runuser -u {user} -- {CLIENT} {target} {path} {auth} {TOKEN_FILE}", check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _secrets(deployed: Deployed) -> list[str]:
    """The host's secrets, read inside it (never printed): token, key, role-id, secret-id."""
    host = deployed.host
    values = [deployed.key]
    for path in (
        TOKEN_FILE,
        "/etc/captcha-solver/role-id",
        "/var/lib/captcha-solver/secret-id",
    ):
        value = host.sh(f"cat {path}").stdout.strip()
        assert len(value) >= 16, f"{path} holds no secret"
        values.append(value)
    return values


def test_a_member_of_the_client_group_solves_over_the_socket_and_tcp_with_the_token(
    deployed: Deployed,
):
    for via in ("unix", "tcp"):
        answer = _as(deployed, MEMBER, via, "/solve", "file")
        assert answer["status"] == 200, (via, answer.get("body"))
        assert answer["body"]["status"] == "ok"
        assert answer["body"]["key_version"] == 1
        assert answer["body"]["token"]  # the emulator's answer, through the env's key


@pytest.mark.parametrize("via", ["unix", "tcp"])
@pytest.mark.parametrize("auth", ["none", "wrong", "basic-file"])
def test_solve_without_the_token_or_with_a_wrong_one_is_refused(
    deployed: Deployed, via: str, auth: str
):
    answer = _as(deployed, MEMBER, via, "/solve", auth)
    assert answer["status"] == 401
    assert answer["www_authenticate"] == "Bearer"
    assert answer["body"]["status"] == "error"
    assert answer["body"]["error"]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_healthz_and_metrics_stay_open(deployed: Deployed, via: str):
    health = _as(deployed, MEMBER, via, "/healthz", "none")
    assert health["status"] == 200
    assert health["body"]["env"] == deployed.deployment.dev
    assert _as(deployed, MEMBER, via, "/metrics", "none")["status"] == 200


def test_a_user_outside_the_group_cannot_connect_nor_read_the_token(deployed: Deployed):
    connect = _as(deployed, OUTSIDER, "unix", "/healthz", "none")
    assert connect == {"stage": "connect", "error": "PermissionError", "errno": 13}
    token = _as(deployed, OUTSIDER, "tcp", "/solve", "file")
    assert token == {"stage": "token", "error": "PermissionError", "errno": 13}
    # TCP is open to every local process, but /solve is not.
    over_tcp = _as(deployed, OUTSIDER, "tcp", "/solve", "none")
    assert (over_tcp["status"], over_tcp["body"]["error"]["code"]) == (401, "UNAUTHORIZED")


def test_files_and_unit(deployed: Deployed):
    host = deployed.host

    def owner_mode(path: str) -> str:
        return host.sh(f"stat -c '%U:%G %a %F' {path}").stdout.strip()

    assert owner_mode(SOCKET) == f"captcha-solver:{GROUP} 660 socket"
    assert owner_mode("/run/captcha-solver") == f"captcha-solver:{GROUP} 2750 directory"
    assert owner_mode(TOKEN_FILE) == f"root:{GROUP} 640 regular file"
    assert owner_mode(CLIENT_DIR) == f"root:{GROUP} 750 directory"
    config = host.sh("cat /etc/captcha-solver/config.toml").stdout
    assert f'unix_socket = "{SOCKET}"' in config
    assert f'token_file = "{TOKEN_FILE}"' in config
    unit = host.sh(
        "systemctl show --property=SupplementaryGroups,ReadWritePaths captcha-solver.service"
    ).stdout
    assert f"SupplementaryGroups={GROUP}" in unit
    assert "ReadWritePaths=/run/captcha-solver" in unit
    # The socket's directory is made again at boot (systemd-tmpfiles), as the role made it.
    boot = host.sh("cat /etc/tmpfiles.d/captcha-solver.conf").stdout
    assert f"d /run/captcha-solver 2750 captcha-solver {GROUP} -" in boot
    # The worker itself has no capability; it holds the client group as a supplementary group
    # (to read the token), and its socket took the group from the set-group-ID directory.
    status = dict(
        line.split(":", 1)
        for line in host.sh(f"cat /proc/{host.main_pid()}/status").stdout.splitlines()
        if ":" in line
    )
    assert int(status["CapEff"].strip(), 16) == 0
    gid = host.sh(f"getent group {GROUP}").stdout.split(":")[2]
    assert gid in status["Groups"].split()
    exposure = host.sh("systemd-analyze security --no-pager captcha-solver.service", check=False)
    print(f"\nsystemd-analyze security, socket and token on: {exposure.stdout.splitlines()[-1]}")


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("captcha_worker_unix_socket", "run/captcha-solver/solve.sock", "must be empty (no"),
        ("captcha_worker_unix_socket", "/run/scrapers/solve.sock", "directly in the worker's"),
        ("captcha_worker_client_group", "Scrapers!", "must be a group name"),
        ("captcha_worker_client_group", "captcha-solver", "other than root and captcha_worker"),
    ],
)
def test_a_bad_socket_path_or_group_fails_before_any_change(
    vault, deployed: Deployed, setting: str, value: str, says: str
):
    host = deployed.host
    pid = host.main_pid()
    result = deploy(vault, deployed.deployment, **{**deployed.extra, setting: value})
    deployed.runs.append(result)
    assert result.rc != 0
    message = " ".join(result.failure_messages(host.name).split())
    assert f"{setting}={json.dumps(value)}" in message
    assert says in message
    assert "Nothing was changed" in message
    assert result.count("changed", host.name) == 0
    assert host.main_pid() == pid


def test_a_second_run_and_a_check_run_change_nothing_and_keep_the_token(vault, deployed: Deployed):
    host = deployed.host
    before = host.sh(f"sha256sum {TOKEN_FILE}").stdout.split()[0]
    pid = host.main_pid()
    second = deploy(vault, deployed.deployment, **deployed.extra)
    deployed.runs.append(second)
    assert second.rc == 0, second.failure_messages(host.name)[-3000:]
    assert [n for n, _ in second.changed_results(host.name)] == []
    assert second.count("changed", host.name) == 0
    check = run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployed.deployment.inventory,
        extra_vars=deployed.extra,
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=True,
        diff=True,
        timeout=600,
    )
    deployed.runs.append(check)
    assert check.rc == 0, check.failure_messages(host.name)[-3000:]
    assert [n for n, _ in check.changed_results(host.name)] == []
    assert host.sh(f"sha256sum {TOKEN_FILE}").stdout.split()[0] == before
    assert host.main_pid() == pid
    print(f"\nsecond run {second.seconds:.1f} s, check run {check.seconds:.1f} s")


def test_no_secret_in_any_output(deployed: Deployed):
    """Read inside the host after every run: the token, the key, the role-id and the secret-id
    appear in no playbook output, the worker's journal, /healthz or /metrics."""
    host = deployed.host
    texts = [run.output for run in deployed.runs]
    texts.append(host.sh("journalctl --unit=captcha-solver.service --no-pager -o cat").stdout)
    for path in ("/healthz", "/metrics"):
        texts.append(json.dumps(_as(deployed, MEMBER, "unix", path, "none")))
    texts.append(json.dumps(_as(deployed, MEMBER, "tcp", "/solve", "file")))
    assert len(deployed.runs) >= 2
    assert_no_secrets("\n".join(texts), _secrets(deployed))


def test_turning_the_socket_off_removes_its_directory_and_boot_entry(vault, deployed: Deployed):
    """Last (the host has no socket after it): the role removes what the socket left, only
    what is there, and the next run has nothing to remove."""
    host = deployed.host
    extra = {**deployed.extra, "captcha_worker_unix_socket": ""}
    off = deploy(vault, deployed.deployment, **extra)
    assert off.rc == 0, off.failure_messages(host.name)[-3000:]
    removed = [
        r.get("path")
        for n, r in off.changed_results(host.name)
        if n.endswith("Remove the socket's directory and its boot entry when there is no socket")
    ]
    assert sorted(removed) == ["/etc/tmpfiles.d/captcha-solver.conf", "/run/captcha-solver"]
    assert not host.exists("/run/captcha-solver")
    assert not host.exists("/etc/tmpfiles.d/captcha-solver.conf")
    again = deploy(vault, deployed.deployment, **extra)
    assert again.rc == 0, again.failure_messages(host.name)[-3000:]
    assert [n for n, _ in again.changed_results(host.name)] == []
    assert_no_secrets(off.output + again.output, _secrets(deployed))
