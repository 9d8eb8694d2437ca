"""The bad inputs of docs/bad-inputs.md that no other suite covered, and the catalogue's own check.

Each test gives one bad input to a real part (ansible-playbook against the test OpenBao, the
``tools/rotate-unattended`` wrapper, a ``captcha-solver serve`` process, a systemd worker
container), asserts the exact error text that the catalogue quotes, and asserts that nothing
changed (Vault data and metadata, AppRole secret-ids, single-use wrapping tokens, host paths).

``test_catalogue_names_only_existing_tests`` parses docs/bad-inputs.md and collects every test id
it names with pytest, so the catalogue cannot point at a test that was renamed or removed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import pytest
import yaml
from captcha_solver.cli import read_health
from captcha_solver.config import render_config

from testkit.creds import new_key, new_tag, write_private
from testkit.hosts import CONTAINERS_CONF, IMAGE, Recipe, build
from testkit.net import free_port
from testkit.paths import REPO
from testkit.playbook import provision_vars, run_argv, run_playbook
from testkit.rotation import RotEnv, run_rotation, write_inventory
from testkit.worker_hosts import Host, worker_container, worker_inventory

CATALOGUE = REPO / "docs" / "bad-inputs.md"
WRAPPER = REPO / "tools" / "rotate-unattended"
SOLVER = Path(sys.executable).parent / "captcha-solver"
DEPLOY = "playbooks/deploy-workers.yml"


# --------------------------------------------------------------------------- rotate-key


INVALID_MODE = (
    "Invalid mode: key_rotation_key_source is auto|variable|staged, key_rotation_wait_mode is "
    "poll|fixed, key_rotation_auth_method is token|approle, key_rotation_confirm_revoked must "
    "name a rotation of '{env}' (its id, {env}-<stamp>-<hex>, or the env name with a new key), "
    "and rollback and confirmation exclude each other; nothing changed"
)


ARG_SPEC_CHOICE = (
    "value of key_rotation_key_source must be one of: auto, variable, staged, got: clipboard"
)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        pytest.param(
            {"key_rotation_rollback": True, "key_rotation_confirm_revoked": "{env}"},
            INVALID_MODE,
            id="confirm_and_rollback",
        ),
        pytest.param(
            {"key_rotation_confirm_revoked": "prod"}, INVALID_MODE, id="confirm_names_another_env"
        ),
        pytest.param(
            {"key_rotation_key_source": "clipboard"}, ARG_SPEC_CHOICE, id="unknown_key_source"
        ),
    ],
)
def test_rotation_invalid_mode_is_refused(
    rot_env: RotEnv, variables: dict[str, Any], expected: str
):
    """Contradictory or unknown rotation modes stop in the pre-flight: key, versions, record and
    staged key unchanged."""
    env = rot_env.name
    values = {k: (v.format(env=env) if isinstance(v, str) else v) for k, v in variables.items()}
    text = expected.format(env=env)
    inv = write_inventory(rot_env)
    before = rot_env.snapshot()
    run = run_rotation(rot_env, inv, values, token=rot_env.rotator_token())
    output = run.output
    assert run.rc == 2, output[-3000:]
    assert text in output, output[-3000:]
    after = rot_env.snapshot()
    assert after == before


# --------------------------------------------------------------------------- rotate-unattended


def _wrapper(rot_env: RotEnv, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env |= rot_env.vault.env() | {"VAULT_TOKEN": rot_env.rotator_token()}
    return run_argv([str(WRAPPER), "--env", rot_env.name, *args], env, timeout=120)


def test_unattended_confirm_and_rollback_together_is_a_usage_error(rot_env: RotEnv):
    """--confirm-revoked with --rollback: exit 64 before ansible-playbook runs; nothing changed."""
    before = rot_env.snapshot()
    proc = _wrapper(rot_env, "--confirm-revoked", "--rollback")
    assert proc.returncode == 64
    assert (
        proc.stderr.strip() == "key-rotation: --confirm-revoked and --rollback exclude each other"
    )
    assert proc.stdout == ""
    assert rot_env.snapshot() == before


def test_unattended_unreadable_extra_vars_file_is_a_usage_error(rot_env: RotEnv):
    """An --extra-vars-file that cannot be read: exit 64 naming the file; nothing changed."""
    missing = rot_env.tmp / "no-such-vars.yml"
    before = rot_env.snapshot()
    proc = _wrapper(rot_env, "--extra-vars-file", str(missing))
    assert proc.returncode == 64
    assert proc.stderr.strip() == f"key-rotation: cannot read {missing}"
    assert proc.stdout == ""
    assert rot_env.snapshot() == before


def test_unattended_unknown_key_source_is_a_usage_error(rot_env: RotEnv):
    """--key-source outside staged|auto: argparse's usage error (exit 2); nothing changed."""
    before = rot_env.snapshot()
    proc = _wrapper(rot_env, "--key-source", "variable")
    assert proc.returncode == 2
    assert (
        "python -m tools.rotate_unattended: error: argument --key-source: invalid choice: "
        "'variable' (choose from 'staged', 'auto')"
    ) in proc.stderr
    assert rot_env.snapshot() == before


# --------------------------------------------------------------------------- the worker process


@dataclass
class WorkerEnv:
    """An env provisioned by the kit (AppRole, key) on the test Vault, for worker processes."""

    tag: str
    env: str
    mount: str
    kv_mount: str
    role_id: str
    client: hvac.Client
    ca_file: Path
    addr: str

    @property
    def role(self) -> str:
        return f"captcha-worker-{self.env}"

    def key_meta(self) -> dict[str, Any]:
        meta = self.client.secrets.kv.v2.read_secret_metadata(
            f"captchaai/{self.env}", mount_point=self.kv_mount
        )["data"]
        return {"current_version": meta["current_version"], "versions": sorted(meta["versions"])}

    def accessors(self) -> list[str]:
        try:
            listed = self.client.auth.approle.list_secret_id_accessors(
                self.role, mount_point=self.mount
            )
        except hvac.exceptions.InvalidPath:
            return []
        return sorted(listed["data"]["keys"])


@pytest.fixture(scope="module")
def worker_env(vault, vault_client) -> WorkerEnv:
    tag = new_tag("c")
    env = f"{tag}-dev"
    extra = provision_vars(
        vault, tag, vault_provision_envs=[env], vault_provision_first_keys={env: new_key()}
    )
    result = run_playbook("playbooks/provision-vault.yml", vault=vault, extra_vars=extra)
    assert result.rc == 0, result.failure_messages()
    mount = f"approle-{tag}"
    role_id = vault_client.auth.approle.read_role_id(f"captcha-worker-{env}", mount_point=mount)[
        "data"
    ]["role_id"]
    return WorkerEnv(tag, env, mount, f"kv-{tag}", role_id, vault_client, vault.ca_file, vault.addr)


@dataclass
class WorkerFiles:
    dir: Path
    config: Path
    role_id: Path
    secret_id: Path
    wrapped: Path
    port: int


def _worker_files(we: WorkerEnv, tmp: Path, *, plain_http: bool = False) -> WorkerFiles:
    """A worker's files for ``we``; ``plain_http``: the config names the Vault over plain http
    (written as a valid config first, by the solver's own render_config, then spoilt)."""
    state = tmp / "state"
    state.mkdir(mode=0o700)
    files = WorkerFiles(
        tmp,
        tmp / "config.toml",
        tmp / "role-id",
        state / "secret-id",
        state / "secret-id.wrapped",
        free_port(),
    )
    files.role_id.write_text(we.role_id + "\n")
    text = render_config(
        {
            "env": we.env,
            "vault": {
                "addrs": [we.addr],
                "ca_file": str(we.ca_file),
                "approle_mount": we.mount,
                "role_id_file": str(files.role_id),
                "secret_id_file": str(files.secret_id),
                "wrapped_secret_id_file": str(files.wrapped),
                "kv_mount": we.kv_mount,
                "key_path": f"captchaai/{we.env}",
                "refresh_interval": 30.0,
                "retries": 1,
            },
            "provider": {"url": f"http://127.0.0.1:{free_port()}"},
            "server": {"host": "127.0.0.1", "port": files.port},
            "logging": {"format": "json", "level": "INFO"},
        }
    )
    if plain_http:
        text = text.replace(we.addr, we.addr.replace("https://", "http://"))
    files.config.write_text(text)
    return files


def _solver_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAULT_", "BAO_", "CAPTCHA_SOLVER_")) and "proxy" not in k.lower()
    }


def _wrapping_token_valid(we: WorkerEnv, token: str) -> bool:
    try:
        we.client.adapter.post("/v1/sys/wrapping/lookup", json={"token": token})
    except hvac.exceptions.InvalidRequest:
        return False
    return True


STARTING = "no key loaded from Vault yet"


def _health_error(port: int, proc: subprocess.Popen[str], within: float = 30) -> tuple[int, dict]:
    deadline = time.monotonic() + within
    last: tuple[int, dict] = (0, {})
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker exited"
        try:
            last = read_health(f"http://127.0.0.1:{port}", timeout=2)
        except OSError:
            time.sleep(0.2)
            continue
        # Until the worker reports why (before its first Vault answer it says only that no key
        # is loaded yet: on a busy machine that can last a while).
        if last[1].get("error") and last[1]["error"] != STARTING:
            return last
        time.sleep(0.2)
    raise AssertionError(f"no error reported in time: {last}")


@pytest.fixture
def serve():
    """``serve(config)`` starts ``captcha-solver serve`` in the background; stopped at the end."""
    procs: list[subprocess.Popen[str]] = []

    def start(config: Path, log: Path) -> subprocess.Popen[str]:
        fh = log.open("w")
        proc = subprocess.Popen(
            [str(SOLVER), "serve", "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_solver_env(),
            text=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_worker_invalid_config_leaves_the_wrapping_token_unspent(
    worker_env: WorkerEnv, tmp_path: Path
):
    """A config with a plain-http Vault address: exit 78 naming the field, before any Vault call:
    the single-use wrapping token stays valid and in place, no secret-id is written."""
    files = _worker_files(worker_env, tmp_path, plain_http=True)
    wrapped = worker_env.client.auth.approle.generate_secret_id(
        worker_env.role, mount_point=worker_env.mount, wrap_ttl="120s"
    )["wrap_info"]["token"]
    write_private(files.wrapped, wrapped + "\n")
    accessors = worker_env.accessors()
    proc = subprocess.run(
        [str(SOLVER), "serve", "--config", str(files.config)],
        env=_solver_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 78
    plain = worker_env.addr.replace("https", "http")
    assert proc.stderr.strip() == (
        f"captcha-solver: invalid configuration: vault.addrs[0]: must start with https://, "
        f"got '{plain}'"
    )
    assert files.wrapped.read_text() == wrapped + "\n"
    assert not files.secret_id.exists()
    assert _wrapping_token_valid(worker_env, wrapped)
    assert worker_env.accessors() == accessors
    assert wrapped not in proc.stdout + proc.stderr


def test_worker_wrong_secret_id_is_unhealthy_and_keeps_its_files(
    worker_env: WorkerEnv, tmp_path: Path, serve
):
    """A secret-id Vault does not know: the worker runs, /healthz 503 with the refusal, no key
    loaded; the secret-id file is not rewritten and the key in Vault is untouched."""
    files = _worker_files(worker_env, tmp_path)
    bogus = str(uuid.uuid4())
    write_private(files.secret_id, bogus + "\n")
    meta = worker_env.key_meta()
    proc = serve(files.config, tmp_path / "worker.log")
    status, health = _health_error(files.port, proc)
    assert status == 503
    assert health["status"] == "unhealthy"
    assert health["key_version"] is None
    assert health["error"] == (
        f"vault auth: AppRole login at '{worker_env.mount}' refused: invalid role or secret ID"
    )
    assert files.secret_id.read_text() == bogus + "\n"
    assert worker_env.key_meta() == meta
    assert proc.poll() is None


def test_worker_missing_role_id_file_is_unhealthy_and_keeps_the_secret_id(
    worker_env: WorkerEnv, tmp_path: Path, serve
):
    """No role-id file: the worker says which file it cannot read; the real secret-id is kept
    (not deleted, not re-issued) and no key is read."""
    files = _worker_files(worker_env, tmp_path)
    files.role_id.unlink()
    secret_id = worker_env.client.auth.approle.generate_secret_id(
        worker_env.role, mount_point=worker_env.mount
    )["data"]["secret_id"]
    write_private(files.secret_id, secret_id + "\n")
    accessors = worker_env.accessors()
    meta = worker_env.key_meta()
    proc = serve(files.config, tmp_path / "worker.log")
    status, health = _health_error(files.port, proc)
    assert status == 503
    assert health["key_version"] is None
    assert health["error"] == (
        f"vault auth: cannot read the role-id file {files.role_id}: No such file or directory"
    )
    assert files.secret_id.read_text() == secret_id + "\n"
    assert worker_env.accessors() == accessors
    assert worker_env.key_meta() == meta
    assert secret_id not in (tmp_path / "worker.log").read_text()


# --------------------------------------------------------------------------- deploy-workers


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    """One fresh systemd worker container for every deploy case of this module."""
    build(Recipe.load())
    with worker_container(IMAGE, "kit-catalogue") as made:
        yield made


@pytest.fixture(scope="module")
def deploy_inventory(worker_env: WorkerEnv, host: Host, tmp_path_factory) -> Path:
    we = worker_env
    inventory = worker_inventory(
        host,
        we.env,
        envs=[we.env],
        vault_addr=we.addr,
        ca_file=we.ca_file,
        kv_mount=we.kv_mount,
        approle_mount=we.mount,
    )
    path = tmp_path_factory.mktemp("catalogue-inv") / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


PORT_MSG = (
    "captcha_worker_port must be a port number 1024-65535 and captcha_worker_listen_host a "
    "loopback address (the worker serves local scrapers only); got {got}. Nothing was changed "
    "on {host}."
)
ADDRS_MSG = (
    "captcha_worker_vault_addrs must list https:// addresses (host[:port]), got {got}; "
    "captcha_worker_package_source must be wheel or spec (spec needs captcha_worker_package_spec)."
    " Nothing was changed on {host}."
)
CA_MSG = (
    "The Vault CA file {got} (captcha_worker_vault_cacert / captcha_kit_vault_cacert) does not "
    "exist on the controller. Nothing was changed."
)


@pytest.mark.containers
@pytest.mark.parametrize(
    "case", ["port_80", "listen_all_interfaces", "http_vault_addr", "missing_ca_file"]
)
def test_deploy_bad_variable_fails_before_any_change(
    vault, worker_env: WorkerEnv, host: Host, deploy_inventory: Path, tmp_path: Path, case: str
):
    """Bad worker variables fail in validation with the exact message: the host has none of the
    role's paths or user, and no secret-id was issued in Vault."""
    port = yaml.safe_load(deploy_inventory.read_text())["all"]["children"]["workers"]["hosts"][
        host.name
    ]["captcha_worker_port"]
    if case == "port_80":
        extra: dict[str, Any] = {"captcha_worker_port": 80}
        expected = PORT_MSG.format(got="127.0.0.1:80", host=host.name)
    elif case == "listen_all_interfaces":
        extra = {"captcha_worker_listen_host": "0.0.0.0"}  # noqa: S104 - the bad input
        expected = PORT_MSG.format(got=f"0.0.0.0:{port}", host=host.name)
    elif case == "http_vault_addr":
        plain = worker_env.addr.replace("https", "http")
        extra = {"captcha_kit_vault_addrs": [plain]}
        expected = ADDRS_MSG.format(got=json.dumps([plain]), host=host.name)
    else:
        missing = tmp_path / "no-ca.pem"
        extra = {"captcha_kit_vault_cacert": str(missing)}
        expected = CA_MSG.format(got=missing)
    before = host.role_footprint()
    accessors = worker_env.accessors()
    result = run_playbook(
        DEPLOY,
        vault=vault,
        inventory=deploy_inventory,
        extra_vars=extra,
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        timeout=600,
    )
    assert result.rc != 0
    messages = [str(r.get("msg", "")) for _, r in result.failed_results(host.name)]
    assert messages == [expected], messages
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before
    assert not any(before.values())
    assert worker_env.accessors() == accessors


# --------------------------------------------------------------------------- the catalogue


ROW_TEST = re.compile(r"`((?:solver/|molecule/\w+/)?tests/[\w/]+\.py::[^`\s]+)`")


def catalogue_rows() -> list[list[str]]:
    """The catalogue's table rows (cells), header and separator excluded."""
    rows = []
    for line in CATALOGUE.read_text().splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        inner = line.strip().removeprefix("|").removesuffix("|")
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]
        if cells and cells[0] == "#":
            continue
        rows.append(cells)
    return rows


def _collected(root: Path, files: set[str], *options: str, env: dict | None = None) -> set[str]:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"),
            *options,
            *files,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def test_catalogue_names_only_existing_tests():
    """Every row has an input, a place, an error text, a guarantee and at least one test id;
    every test id is collected by pytest; the texts of this file's cases are quoted verbatim."""
    rows = catalogue_rows()
    assert len(rows) >= 20
    ids: list[str] = []
    for cells in rows:
        assert len(cells) == 6, cells
        number, bad_input, where, error, unchanged, tests = cells
        assert number.isdigit(), cells
        assert all((bad_input, where, error, unchanged)), cells
        assert error.startswith("`"), cells
        found = ROW_TEST.findall(tests)
        assert found, f"row {number} names no test"
        ids += found
    repo_ids = {i for i in ids if i.startswith("tests/")}
    solver_ids = {i.removeprefix("solver/") for i in ids if i.startswith("solver/")}
    molecule_ids = {i for i in ids if i.startswith("molecule/")}
    collected = _collected(REPO, {i.split("::")[0] for i in repo_ids})
    if molecule_ids:  # as molecule's verifier loads them (.config/molecule/config.yml)
        shared = {**os.environ, "PYTHONPATH": str(REPO / "molecule" / "shared")}
        files = {i.split("::")[0] for i in molecule_ids}
        collected |= _collected(REPO, files, "-p", "conftest", env=shared)
    if solver_ids:
        collected |= {
            f"solver/{i}"
            for i in _collected(REPO / "solver", {i.split("::")[0] for i in solver_ids})
        }
    missing = sorted(i for i in ids if i not in collected)
    assert not missing, f"the catalogue names tests that do not exist: {missing}"
    literals = _string_literals(Path(__file__))
    own = [c for c in rows if "tests/test_bad_input_catalogue.py::" in c[5]]
    assert own
    for cells in own:  # the message's opening words are the ones this module asserts
        opening = re.split(r"<[^>]*>", cells[3].strip("`"))[0][:40]
        if len(opening) >= 12:
            assert any(opening in lit for lit in literals), (cells[0], opening)


def _string_literals(path: Path) -> list[str]:
    """Every string constant of a module (adjacent literals joined, f-string parts apart)."""
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
