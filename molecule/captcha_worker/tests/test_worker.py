"""captcha_worker on real systemd hosts: files, service, hardening, secrecy and behaviour.

Each test runs on both hosts (dev on 18451, prod on 18452). Keys come from the test Vault at
run time and are wrapped in ``Secret`` at once, so no assertion or log line can show them.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import testbed
from conftest import Secret, converge

from testkit.worker_hosts import STATUS_COMMAND, status_json

SERVICE = "captcha-solver.service"
CONFIG = "/etc/captcha-solver/config.toml"
ROLE_ID = "/etc/captcha-solver/role-id"
CA_FILE = "/etc/captcha-solver/vault-ca.pem"
STATE_DIR = "/var/lib/captcha-solver"
SECRET_ID = f"{STATE_DIR}/secret-id"
ACCESSOR = f"{STATE_DIR}/secret-id.accessor"
WRAPPED = f"{STATE_DIR}/secret-id.wrapped"
VENV = "/opt/captcha-solver/venv"
OTHER_ENV = {"dev": "prod", "prod": "dev"}


def _main_pid(host) -> int:
    return int(host.check_output(f"systemctl show --property=MainPID --value {SERVICE}"))


def _healthz(host, port: int) -> dict:
    """/healthz as the solver's own `captcha-solver status` prints it on the host."""
    body = status_json(host.run(STATUS_COMMAND).stdout)
    assert body, f"no worker answered on the host (port {port})"
    return body


def _current_key(env: str) -> tuple[int, Secret]:
    version, key = testbed.current_key(env)
    return version, Secret(key)


# --------------------------------------------------------------------------- user and files
def test_service_user_is_a_system_account_without_login(host):
    """The worker runs as a system user with no shell and a locked password."""
    user = host.user("captcha-solver")
    assert user.exists
    assert user.uid < 1000
    assert user.group == "captcha-solver"
    assert user.shell == "/usr/sbin/nologin"
    assert user.password in ("!", "*", "!*")


def test_config_file_is_readable_by_root_and_the_service_group_only(host, host_vars):
    """config.toml: 0640 root:captcha-solver, with this host's env and port."""
    config = host.file(CONFIG)
    assert (config.user, config.group, config.mode) == ("root", "captcha-solver", 0o640)
    assert f'env = "{host_vars["captcha_worker_env"]}"' in config.content_string
    assert f"port = {host_vars['captcha_worker_port']}" in config.content_string


def test_config_file_holds_no_secret_settings(host):
    """No key, secret-id or token setting in the configuration, only file paths."""
    content = host.file(CONFIG).content_string
    assert not re.search(r"^\s*(api_key|secret_id|token|key)\s*=", content, re.MULTILINE)


def test_role_id_file_is_readable_by_root_and_the_service_group_only(host):
    """role-id: 0640 root:captcha-solver, non-empty."""
    role_id = host.file(ROLE_ID)
    assert (role_id.user, role_id.group, role_id.mode) == ("root", "captcha-solver", 0o640)
    assert role_id.size > 0


def test_vault_ca_is_the_test_servers_ca(host):
    """The worker trusts exactly the CA that signed the test Vault's certificate."""
    ca = host.file(CA_FILE)
    assert (ca.user, ca.mode) == ("root", 0o644)
    assert ca.content_string == testbed.vault().ca_file.read_text()


def test_state_directory_is_private_to_the_service_user(host):
    """/var/lib/captcha-solver: 0700 captcha-solver."""
    state = host.file(STATE_DIR)
    assert state.is_directory
    assert (state.user, state.group, state.mode) == ("captcha-solver", "captcha-solver", 0o700)


def test_secret_id_file_is_private_to_the_service_user(host):
    """The unwrapped secret-id is a 0600 file of the service user."""
    secret_id = host.file(SECRET_ID)
    assert (secret_id.user, secret_id.mode) == ("captcha-solver", 0o600)
    assert secret_id.size > 0


def test_wrapping_token_was_used_up_by_the_worker(host):
    """The single-use wrapping token is gone: the worker unwrapped it and deleted the file."""
    assert not host.file(WRAPPED).exists


def test_secret_id_accessor_is_known_to_vault_with_this_hosts_metadata(host, host_vars):
    """The accessor the worker wrote belongs to a live secret-id issued for this host."""
    env = host_vars["captcha_worker_env"]
    accessor = host.file(ACCESSOR).content_string.strip()
    info = testbed.vault_client().auth.approle.read_secret_id_accessor(
        f"captcha-worker-{env}", accessor
    )["data"]
    assert info["metadata"]["host"] == host.backend.get_hostname()
    assert info["metadata"]["env"] == env


def test_virtualenv_holds_the_pinned_dependencies(host):
    """The venv has the solver and exactly the pinned versions of its dependencies."""
    frozen = host.check_output(f"{VENV}/bin/python -m pip freeze --disable-pip-version-check")
    packages = dict(
        line.split("==", 1) for line in frozen.splitlines() if "==" in line and "@" not in line
    )
    assert packages["aiohttp"] == "3.14.5"
    assert packages["hvac"] == "2.4.0"
    assert packages["requests"] == "2.34.2"
    assert "captcha-solver" in frozen


# --------------------------------------------------------------------------- service
def test_unit_is_enabled_and_active(host):
    """The worker is enabled and running under systemd."""
    service = host.service("captcha-solver")
    assert service.is_enabled
    assert service.is_running


def test_unit_restarts_a_worker_killed_by_a_signal(host):
    """systemd counts death by SIGHUP/SIGINT/SIGTERM/SIGPIPE as a clean stop and would leave
    the unit inactive under Restart=on-failure; the unit forces a restart for them (a stop
    asked through systemctl is still final)."""
    forced = host.check_output(
        f"systemctl show --property=RestartForceExitStatus --value {SERVICE}"
    ).split()
    assert {"SIGHUP", "SIGINT", "SIGTERM", "SIGPIPE"} <= {
        f"SIG{s.removeprefix('SIG')}" for s in forced
    }


def test_worker_writes_no_core_file_and_is_not_dumpable(host):
    """The key, token and secret-id live in memory only: the core limit is 0 (LimitCORE=0) and
    the worker reported no gap in its own hardening (core limit, non-dumpable)."""
    pid = _main_pid(host)
    limits = host.file(f"/proc/{pid}/limits").content_string
    assert re.search(r"^Max core file size\s+0\s+0\s+bytes", limits, re.MULTILINE), limits
    journal = host.check_output(f"journalctl -u {SERVICE} --no-pager -o cat")
    assert "process hardening incomplete" not in journal


def test_worker_runs_as_the_service_user(host):
    """The main process runs as captcha-solver, not root."""
    pid = _main_pid(host)
    uid_line = host.file(f"/proc/{pid}/status").content_string
    uid = host.user("captcha-solver").uid
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", uid_line, re.MULTILINE)


def test_worker_listens_on_loopback_only(host, host_vars):
    """Every listening socket of the worker is on 127.0.0.1, the configured port among them."""
    cgroup = host.check_output(f"systemctl show --property=ControlGroup --value {SERVICE}")
    lines = [
        line
        for line in host.check_output("ss -Htlne").splitlines()
        if line.rstrip().endswith(cgroup) or f"{cgroup} " in line
    ]
    addresses = {line.split()[3] for line in lines}
    assert addresses == {f"127.0.0.1:{host_vars['captcha_worker_port']}"}


def test_systemd_security_exposure_is_at_most_2(host):
    """`systemd-analyze security` rates the unit 2.0 or better."""
    out = host.run(f"systemd-analyze security --no-pager --threshold=20 {SERVICE}")
    assert out.rc == 0, out.stdout[-2000:]
    level = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout).group(1))
    assert level <= 2.0


def test_hardening_is_applied_to_the_running_process(host):
    """The sandbox is real (SYS_ADMIN lets systemd build it): / is read-only for the worker,
    /tmp is private, no capabilities, no new privileges, seccomp on."""
    pid = _main_pid(host)
    mounts = host.file(f"/proc/{pid}/mountinfo").content_string.splitlines()
    root = next(m for m in mounts if m.split()[4] == "/")
    assert "ro" in root.split()[5].split(",")
    tmp_mounts = [m for m in mounts if m.split()[4] == "/tmp"]  # noqa: S108
    assert tmp_mounts, "PrivateTmp: /tmp should be its own mount"
    status = host.file(f"/proc/{pid}/status").content_string
    assert re.search(r"^CapEff:\s+0+$", status, re.MULTILINE)
    assert re.search(r"^CapBnd:\s+0+$", status, re.MULTILINE)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE)


def test_worker_cannot_write_outside_its_state_directory(host):
    """ProtectSystem=strict in the worker's own mount namespace: /opt and /etc are read-only,
    /var/lib/captcha-solver is writable."""
    pid = _main_pid(host)

    def in_worker_namespace(command: str) -> subprocess.CompletedProcess[str]:
        # Entering another user's namespaces needs CAP_SYS_PTRACE: a privileged exec.
        return subprocess.run(
            [
                "podman",
                "exec",
                "--privileged",
                host.backend.get_hostname(),
                "nsenter",
                f"--target={pid}",
                "--mount",
                "sh",
                "-c",
                command,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    for path in ("/opt/captcha-solver/.probe", "/etc/captcha-solver/.probe"):
        denied = in_worker_namespace(f"touch {path}")
        assert denied.returncode != 0
        assert "Read-only file system" in denied.stderr
    allowed = in_worker_namespace(f"touch {STATE_DIR}/.probe && rm {STATE_DIR}/.probe")
    assert allowed.returncode == 0, allowed.stderr


# --------------------------------------------------------------------------- the key stays secret
def test_key_is_in_no_file_on_the_host(secret_probe, host_vars):
    """Neither this worker's key nor the other env's is in any file (the canary is found)."""
    canary, remove = secret_probe.plant_file_canary("/var/lib")
    try:
        assert secret_probe.files_with([canary]), "the file search misses a planted value"
    finally:
        remove()
    env = host_vars["captcha_worker_env"]
    keys = [_current_key(env)[1], _current_key(OTHER_ENV[env])[1]]
    assert secret_probe.files_with(keys) == []


def test_key_is_not_in_the_workers_environment_or_command_line(host, secret_probe, host_vars):
    """/proc/<pid>/environ and cmdline of every worker process lack the key."""
    canary_pid, canary, stop = secret_probe.start_proc_canary()
    try:
        assert secret_probe.proc_hits([canary_pid], [canary]), "the /proc search misses a value"
    finally:
        stop()
    cgroup = host.check_output(f"systemctl show --property=ControlGroup --value {SERVICE}")
    pids = [
        int(p)
        for p in host.check_output(f"cat /sys/fs/cgroup/systemd{cgroup}/cgroup.procs").split()
    ]
    assert _main_pid(host) in pids
    _, key = _current_key(host_vars["captcha_worker_env"])
    assert secret_probe.proc_hits(pids, [key]) == []


def test_key_is_not_in_the_journal(secret_probe, host_vars):
    """No journal entry (any field) carries the key, while the worker logs in JSON."""
    canary = secret_probe.plant_journal_canary()
    assert secret_probe.journal_hits([canary]) > 0, "the journal search misses a value"
    _, key = _current_key(host_vars["captcha_worker_env"])
    assert secret_probe.journal_hits([key]) == 0


# --------------------------------------------------------------------------- behaviour
def test_healthz_shows_the_env_and_the_current_key_version(host, host_vars):
    """/healthz: this env, the key version Vault holds now, Vault reachable, masked key."""
    env = host_vars["captcha_worker_env"]
    version, key = _current_key(env)
    health = _healthz(host, host_vars["captcha_worker_port"])
    assert health["env"] == env
    assert health["key_version"] == version
    assert health["vault_reachable"] is True
    assert health["key_fingerprint"] == "***" + key.reveal()[-4:]


def test_solve_goes_through_the_emulator_with_this_envs_key(host, host_vars):
    """A real POST /solve returns a token, and the emulator counted it on this env's key."""
    testbed.ensure_emulator(sorted(OTHER_ENV))
    _, key = _current_key(host_vars["captcha_worker_env"])
    admin = testbed.emulator_admin()
    before = admin.counters(key.reveal())["submitted"]
    out = host.check_output(
        "python3 -c 'import json, urllib.request\n"
        'body = json.dumps({"method": "userrecaptcha", "params": '
        '{"googlekey": "6Le-test", "pageurl": "https://example.test/login"}}).encode()\n'
        f'req = urllib.request.Request("http://127.0.0.1:{host_vars["captcha_worker_port"]}/solve",'
        ' data=body, headers={"Content-Type": "application/json"})\n'
        "print(urllib.request.urlopen(req, timeout=60).read().decode())'"
    )
    result = json.loads(out)
    assert result["status"] == "ok"
    assert len(result["token"]) > 20
    assert result["key_version"] == _current_key(host_vars["captcha_worker_env"])[0]
    assert admin.counters(key.reveal())["submitted"] == before + 1


def test_this_envs_credentials_are_refused_the_other_envs_key(host, host_vars):
    """Logged in with this worker's role-id and secret-id, Vault serves this env's key and
    answers 403 for the other env's key."""
    env = host_vars["captcha_worker_env"]
    other = OTHER_ENV[env]
    script = (
        "import hvac\n"
        "from hvac.exceptions import Forbidden\n"
        f"c = hvac.Client(url='https://127.0.0.1:18250', verify='{CA_FILE}')\n"
        f"c.auth.approle.login(role_id=open('{ROLE_ID}').read().strip(),"
        f" secret_id=open('{SECRET_ID}').read().strip())\n"
        "def read(env):\n"
        "    try:\n"
        "        c.secrets.kv.v2.read_secret_version(path=f'captchaai/{env}',"
        " mount_point='secret', raise_on_deleted_version=True)\n"
        "        return 200\n"
        "    except Forbidden:\n"
        "        return 403\n"
        f"print(read('{env}'), read('{other}'))\n"
        "c.auth.token.revoke_self()\n"
    )
    out = host.run(f'{VENV}/bin/python -c "{script}"')
    assert out.rc == 0, out.stderr[-1000:]
    assert out.stdout.split() == ["200", "403"]


def test_reload_picks_up_a_new_key_version_without_a_restart(host, host_vars):
    """systemctl reload (SIGHUP) makes the worker read the new key version; same PID."""
    env = host_vars["captcha_worker_env"]
    port = host_vars["captcha_worker_port"]
    pid = _main_pid(host)
    new = testbed.new_key_version(env)
    host.check_output(f"systemctl reload {SERVICE}")
    deadline = time.monotonic() + 20
    health = _healthz(host, port)
    while health["key_version"] != new.version and time.monotonic() < deadline:
        time.sleep(0.2)
        health = _healthz(host, port)
    assert health["key_version"] == new.version
    assert health["key_fingerprint"] == new.fingerprint
    assert _main_pid(host) == pid


@pytest.fixture(autouse=True)
def _no_secret_in_reports(request):
    """Keep pytest from showing local variables (where keys live) in failure reports."""
    request.config.option.showlocals = False


@pytest.fixture(scope="module")
def check_run() -> dict:
    """One `--check --diff` run of the converge playbook on every host (json callback)."""
    return converge("--check", "--diff")


def test_check_and_diff_mode_after_converge_report_no_change(host, check_run):
    """`--check --diff` on the converged hosts reports nothing to change."""
    name = host.backend.get_hostname()
    changed_or_failed = [
        (task["task"]["name"], result.get("msg", ""))
        for play in check_run["plays"]
        for task in play["tasks"]
        for result in [task["hosts"].get(name, {})]
        if result.get("changed") or result.get("failed")
    ]
    assert check_run["stats"][name]["failures"] == 0, changed_or_failed
    assert check_run["stats"][name]["changed"] == 0, changed_or_failed
