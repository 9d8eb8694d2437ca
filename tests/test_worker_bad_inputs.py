"""captcha_worker: bad input fails with a clear error before anything changes on the host.

Real parts: a systemd container of the kit's host image (podman, host network, SYS_ADMIN), the
test OpenBao, ansible-playbook with playbooks/deploy-workers.yml. The tests share one container
and one deployment (names of their own on the shared test server, ``make_deployment``): each
asserts that its run changed nothing on the host, so the next one still finds a fresh host, and
the last one runs check mode on it.
Vault unreachable from a host that already runs a worker: tests/test_worker_lifecycle.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import hvac
import pytest

from testkit.hosts import CONTAINERS_CONF, IMAGE, Recipe, build
from testkit.net import free_port
from testkit.playbook import run_playbook
from testkit.worker_hosts import (
    PLAYBOOK,
    Deployment,
    Host,
    deploy,
    make_deployment,
    worker_container,
)

pytestmark = pytest.mark.containers


@pytest.fixture(scope="module")
def host_image() -> str:
    build(Recipe.load())
    return IMAGE


@pytest.fixture(scope="module")
def host(host_image: str) -> Iterator[Host]:
    with worker_container(host_image, "kit-bad-input") as made:
        yield made


@pytest.fixture(scope="module")
def deployment(vault, host: Host, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """`<tag>-dev` provisioned with a first key; `<tag>-staging` known but not provisioned."""
    return make_deployment(vault, host, tmp_path_factory.mktemp("bad-input"))


def _failure(result, host: Host) -> str:
    return result.failure_messages(host.name)


def test_unknown_env_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """An env the inventory does not list is refused, naming it and the known ones."""
    before = host.role_footprint()
    result = deploy(vault, deployment, captcha_worker_env="qa")
    assert result.rc != 0
    message = _failure(result, host)
    assert 'captcha_worker_env="qa" is not a known environment' in message
    assert f"{deployment.tag}-dev" in message
    assert "Nothing was changed" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_env_without_approle_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """A known env that Vault was not provisioned for (no AppRole, no role-id) is refused."""
    before = host.role_footprint()
    env = f"{deployment.tag}-staging"
    result = deploy(vault, deployment, captcha_worker_env=env)
    assert result.rc != 0
    message = _failure(result, host)
    assert f"AppRole role captcha-worker-{env} does not exist" in message
    assert "not provisioned" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_plain_http_provider_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """A provider URL that would carry the key in clear (http:// to a non-loopback host) is
    refused before anything on the host changes."""
    before = host.role_footprint()
    result = deploy(vault, deployment, captcha_worker_provider_url="http://ocr.captchaai.com")
    assert result.rc != 0
    message = _failure(result, host)
    assert (
        'captcha_worker_provider_url="http://ocr.captchaai.com" would send the API key' in message
    )
    assert "in clear: use https://" in message
    assert "Nothing was changed" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_port_taken_on_the_host_fails_before_any_change(vault, host: Host, deployment: Deployment):
    """Another process listening on the worker's port is named in the error; nothing changes."""
    port = free_port()
    host.sh(
        f"setsid python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & "
        f"for i in $(seq 50); do ss -Htln 'sport = :{port}' | grep -q . && exit 0; sleep 0.1; done;"
        " exit 1"
    )
    try:
        before = host.role_footprint()
        result = deploy(vault, deployment, captcha_worker_port=port)
    finally:
        host.sh(f"pkill -f 'http[.]server {port}'")
    assert result.rc != 0
    message = _failure(result, host)
    assert f"Port {port} is already taken" in message
    assert f"127.0.0.1:{port}" in message
    assert result.count("changed", host.name) == 0
    assert host.role_footprint() == before


def test_check_mode_on_a_fresh_host_reports_changes_and_changes_nothing(
    vault, vault_client, host: Host, deployment: Deployment
):
    """--check --diff on a host without the worker runs every validation, reports the work
    (a secret-id included) and changes neither the host nor Vault."""
    role = f"captcha-worker-{deployment.dev}"
    mount = f"approle-{deployment.tag}"

    def accessors() -> list[str]:
        try:
            listed = vault_client.auth.approle.list_secret_id_accessors(role, mount_point=mount)
        except hvac.exceptions.InvalidPath:  # no secret-id at all
            return []
        return sorted(listed["data"]["keys"])

    accessors_before = accessors()
    before = host.role_footprint()
    result = run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=deployment.inventory,
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=True,
        diff=True,
        timeout=600,
    )
    assert result.rc == 0, result.failure_messages(host.name)[-3000:]
    assert result.count("changed", host.name) > 0
    assert host.role_footprint() == before
    assert accessors() == accessors_before
