"""A rolling redeploy of two workers of one env (playbooks/deploy-workers.yml, one host per
batch) under solve load, and the gate that stops a rollout at its first bad batch.

* A config change restarts the workers one after the other: the second host's worker starts
  to stop only after the first one is back, and clients that retry a draining (503) or
  restarting (refused) worker lose no solve.
* A bad setting fails the first host with the solver's own message before its config file is
  replaced: no worker changes or goes down (same config, same PID, still ok; clients that do
  not retry lose nothing), and no task runs on the second host.
* A batch of two where one host fails: the failed host keeps its old config and worker, the
  other host of the batch finishes its deploy (new config, restart, healthy) before the batch
  gate fails the batch, and no later batch starts. A worker older than the files it
  reads (a run interrupted between writing and restarting) is restarted by the next run, and
  check mode says so.
* A worker unhealthy after its restart fails its host while the rest of its batch finishes, and
  no later batch starts; so does a host no SSH reaches.

Real parts: two systemd containers of the kit's host image reached over SSH as `deploy` with
become (testkit/worker_hosts.py), the test OpenBao, the CaptchaAI emulator on free ports
(the containers share the host network), ansible-playbook with playbooks/deploy-workers.yml.
The order of restarts is read from systemd's monotonic timestamps (one kernel clock for all
containers), never from durations.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
import yaml

from testkit.hosts import CONTAINERS_CONF, ssh_host_vars
from testkit.loadgen import LoadGenerator
from testkit.net import free_port
from testkit.playbook import PlaybookResult, run_playbook
from testkit.tokens import deployer_token
from testkit.worker_hosts import (
    PLAYBOOK,
    Deployment,
    Host,
    deploy,
    emulated_env,
)

pytestmark = pytest.mark.containers

CONFIG = "/etc/captcha-solver/config.toml"
CHANGED = {"poll_interval": 0.6, "first_poll_delay": {"default": 0.3}}
TYPO = {"request_timeuot": 30}
TASK_CONFIG = "captcha_worker : Write the worker configuration"
TASK_WAIT = "captcha_worker : Wait until /healthz reports a key version"
TASK_RESTART = "captcha_worker : Restart the worker"
GATE = "Stop the rollout after this batch unless enough of its hosts are healthy"
TASK_STALE = "captcha_worker : Restart the worker where it started before the files it reads"


@dataclass
class Fleet:
    first: Host
    second: Host
    deployment: Deployment

    @property
    def hosts(self) -> list[Host]:
        return [self.first, self.second]

    @property
    def urls(self) -> list[str]:
        return [self.deployment.worker_url(h.name) for h in self.hosts]


@pytest.fixture(scope="module")
def fleet(vault, tmp_path_factory) -> Iterator[Fleet]:
    """Two hosts of one env, deployed once (one batch), against an emulator of their own."""
    with emulated_env(vault, "kit-redeploy", tmp_path_factory.mktemp("redeploy"), count=2) as env:
        one, two = env.hosts
        deployment = env.deployment
        first = deploy(vault, deployment)
        assert first.rc == 0, first.failure_messages(one.name)[-3000:]
        print(f"\nfirst deploy of two fresh hosts: {first.seconds:.1f} s")
        # Batches follow the inventory's order.
        by_name = {one.name: one, two.name: two}
        ordered = [by_name[name] for name in deployment.hosts]
        yield Fleet(ordered[0], ordered[1], deployment)


def _wait_for_solves(load: LoadGenerator, urls: list[str], more_than: dict[str, int]) -> None:
    """Until every worker solved more than ``more_than`` (bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(load.stats[u].ok > more_than.get(u, 0) for u in urls):
            return
        time.sleep(0.2)
    pytest.fail(f"the workers did not solve under load: {load.summary()}")


def _ok_counts(load: LoadGenerator, urls: list[str]) -> dict[str, int]:
    return {u: load.stats[u].ok for u in urls}


def _batches(result: PlaybookResult) -> list[dict[str, Any]]:
    """Per batch (a play entry of the json callback): its hosts, its start and end."""
    out = []
    for play in result.data.get("plays", []):
        hosts = sorted({h for t in play.get("tasks", []) for h in t.get("hosts", {})})
        duration = play["play"].get("duration", {})
        out.append({"hosts": hosts, "duration": duration})
    return out


def _seconds(duration: dict[str, str]) -> float | None:
    try:
        start, end = (datetime.fromisoformat(duration[k].rstrip("Z")) for k in ("start", "end"))
    except (KeyError, ValueError):
        return None
    return round((end - start).total_seconds(), 1)


def _redeploy_under_load(
    vault, fleet: Fleet, load: LoadGenerator, settings: dict[str, Any]
) -> tuple[PlaybookResult, dict[str, Any]]:
    """A redeploy one host at a time with ``settings`` while ``load`` solves; every worker
    solves again after it. The run's result and the load's summary."""
    urls = fleet.urls
    with load:
        _wait_for_solves(load, urls, {})
        result = deploy(
            vault,
            fleet.deployment,
            captcha_kit_deploy_batch=1,
            captcha_worker_provider_settings=settings,
        )
        _wait_for_solves(load, urls, _ok_counts(load, urls))
    return result, load.summary()


def _ran(result: PlaybookResult, host: Host) -> list[str]:
    return [name for name, _ in result.task_results(host.name)]


def _changed(result: PlaybookResult, host: Host) -> list[str]:
    return [name for name, _ in result.changed_results(host.name)]


def test_config_change_under_load_restarts_one_host_after_the_other(vault, fleet: Fleet):
    pids = {h.name: h.main_pid() for h in fleet.hosts}
    urls = fleet.urls
    # Both restarted workers solve again before the load stops.
    load = LoadGenerator(urls, clients=4, duration=600, pause=0.1, timeout=30, retry_for=30)
    result, summary = _redeploy_under_load(vault, fleet, load, CHANGED)

    assert result.rc == 0, result.failure_messages(fleet.second.name)[-3000:]
    for host in fleet.hosts:
        assert "poll_interval = 0.6" in host.sh(f"cat {CONFIG}").stdout
        assert host.main_pid() != pids[host.name], f"{host.name} was not restarted"
        assert host.health()["status"] == "ok"
    batches = _batches(result)
    assert [b["hosts"] for b in batches] == [[fleet.first.name], [fleet.second.name]]
    for host in fleet.hosts:
        ran = _ran(result, host)
        assert TASK_RESTART in ran, ran
        assert TASK_WAIT in ran, ran
        # Restarted by the handler after its files changed: nothing is older than the worker.
        assert TASK_STALE not in _changed(result, host)
    # One after the other: the second worker began to stop (drain) after the first one's new
    # process was up; the first batch had ended (its health wait passed) before that.
    first, second = fleet.first.unit_times(), fleet.second.unit_times()
    assert first["ActiveEnter"] < second["ActiveExit"], (first, second)
    assert first["ExecMainStart"] < second["ExecMainStart"], (first, second)

    assert summary["attempted"] > 0
    assert summary["failed"] == 0, summary["first_failures"]
    for url in urls:
        assert summary["workers"][url]["ok"] > 0, summary["workers"]
    print(
        f"\nredeploy under load: {result.seconds:.1f} s, batches"
        f" {[_seconds(b['duration']) for b in batches]} s; solves attempted"
        f" {summary['attempted']}, failed {summary['failed']}, retried {summary['retries']}"
    )


def test_bad_setting_stops_the_rollout_at_the_first_host_and_changes_nothing(vault, fleet: Fleet):
    before = {h.name: (h.checksum(CONFIG), h.main_pid()) for h in fleet.hosts}
    urls = fleet.urls
    # Clients that do not retry: any worker restarting or down would fail solves.
    load = LoadGenerator(urls, clients=2, duration=600, pause=0.1, timeout=30)
    result, summary = _redeploy_under_load(vault, fleet, load, TYPO)

    assert result.rc != 0
    first, second = fleet.first, fleet.second
    failed = result.failed_results(first.name)
    assert [name for name, _ in failed] == [TASK_CONFIG], failed
    assert "provider.request_timeuot" in str(failed)
    assert TASK_RESTART not in _ran(result, first)
    # The second host was not touched: no task ran there, it is not in the recap.
    assert _ran(result, second) == []
    assert second.name not in result.stats
    for host in fleet.hosts:
        assert (host.checksum(CONFIG), host.main_pid()) == before[host.name], host.name
        assert host.health()["status"] == "ok"
    assert summary["attempted"] > 0
    assert summary["failed"] == 0, summary["first_failures"]
    print(
        f"\nbad setting: {result.seconds:.1f} s; solves attempted {summary['attempted']},"
        f" failed {summary['failed']}"
    )


def _ghost() -> dict[str, Any]:
    """Inventory vars of a host no SSH reaches (nothing listens on its port)."""
    return {**ssh_host_vars(free_port()), "captcha_worker_port": free_port()}


def test_a_failed_host_fails_alone_and_no_later_batch_starts(vault, fleet: Fleet):
    first, second = fleet.first, fleet.second
    # A batch of both hosts, then one more host (no SSH behind it) as the second batch.
    ghost = "kit-redeploy-ghost"
    own = {"poll_interval": 0.7, "first_poll_delay": {"default": 0.3}}
    partial = fleet.deployment.variant(
        "partial",
        host_vars={
            first.name: {"captcha_worker_provider_settings": TYPO},
            second.name: {"captcha_worker_provider_settings": own},
        },
        extra_hosts={ghost: {**_ghost(), "captcha_worker_env": fleet.deployment.dev}},
    )
    before = {h.name: (h.checksum(CONFIG), h.main_pid()) for h in fleet.hosts}

    stopped = deploy(vault, partial, captcha_kit_deploy_batch=2)

    assert stopped.rc != 0
    assert [n for n, _ in stopped.failed_results(first.name)] == [TASK_CONFIG]
    assert first.checksum(CONFIG) == before[first.name][0]
    assert first.main_pid() == before[first.name][1]
    # The other host of the batch finished its deploy; only the batch gate marks it failed.
    gate = stopped.failed_results(second.name)
    assert [n for n, _ in gate] == [GATE]
    assert "deployed and healthy" in str(gate[0][1]["msg"])
    assert TASK_CONFIG in _changed(stopped, second)
    assert TASK_WAIT in _ran(stopped, second)
    assert second.main_pid() != before[second.name][1]
    assert "poll_interval = 0.7" in second.sh(f"cat {CONFIG}").stdout
    assert second.health()["status"] == "ok"
    # The next batch was not started.
    assert _ran(stopped, Host(ghost)) == []
    assert ghost not in stopped.stats

    # A worker older than its config (as after a run interrupted between the two): check mode
    # says the next run restarts it and changes nothing; the next run does.
    pid = second.main_pid()
    second.sh(f"touch {CONFIG}")
    fixed = fleet.deployment.variant(
        "fixed", host_vars={second.name: {"captcha_worker_provider_settings": own}}
    )
    preview = run_playbook(
        PLAYBOOK,
        vault=vault,
        inventory=fixed.inventory,
        args=["--limit", second.name],
        env={"CONTAINERS_CONF": str(CONTAINERS_CONF)},
        check=True,
    )
    assert preview.rc == 0, preview.failure_messages(second.name)[-3000:]
    assert TASK_CONFIG not in _changed(preview, second)
    assert TASK_STALE in _changed(preview, second)
    assert second.main_pid() == pid
    rerun = deploy(vault, fixed)
    assert rerun.rc == 0, rerun.failure_messages(second.name)[-3000:]
    assert TASK_CONFIG not in _changed(rerun, second)
    assert TASK_STALE in _changed(rerun, second)
    assert TASK_STALE not in _changed(rerun, first)
    assert second.main_pid() != pid
    assert second.health()["status"] == "ok"
    print(
        f"\nstopped batch: {stopped.seconds:.1f} s, check mode {preview.seconds:.1f} s,"
        f" rerun {rerun.seconds:.1f} s"
    )


def test_an_unhealthy_or_unreachable_host_stops_the_rollout_after_its_batch(vault, fleet: Fleet):
    first, second = fleet.first, fleet.second
    ghost = "kit-redeploy-ghost"
    unreachable = {**_ghost(), "captcha_worker_env": fleet.deployment.dev}
    pids = {h.name: h.main_pid() for h in fleet.hosts}

    # A batch of both hosts where the first one's worker restarts into a key path its policy
    # does not allow (a valid config: it starts, then never gets a key), then the ghost.
    broken = fleet.deployment.variant(
        "unhealthy",
        host_vars={
            first.name: {
                "captcha_worker_key_path_prefix": "captchaai-elsewhere",
                "captcha_worker_health_timeout": 5,
            },
            second.name: {"captcha_worker_provider_settings": CHANGED},
        },
        extra_hosts={ghost: unreachable},
    )
    unhealthy = deploy(vault, broken, captcha_kit_deploy_batch=2)

    assert unhealthy.rc != 0
    failed = unhealthy.failed_results(first.name)
    assert [n for n, _ in failed] == [
        TASK_WAIT,
        "captcha_worker : Fail with the worker's own error",
    ]
    assert "is not healthy" in str(failed[-1][1]["msg"])
    assert first.main_pid() != pids[first.name]
    # The other host of the batch finished its restart and health wait before the stop.
    assert second.main_pid() != pids[second.name]
    assert TASK_WAIT in _ran(unhealthy, second)
    assert [n for n, _ in unhealthy.failed_results(second.name)] == [GATE]
    assert second.health()["status"] == "ok"
    # The next batch was not started.
    assert _ran(unhealthy, Host(ghost)) == []

    # The first host repaired, in a batch with a host no SSH reaches (the batch gate counts
    # unreachable hosts too), then the second host.
    repaired = fleet.deployment.variant(
        "unreachable",
        host_vars={second.name: {"captcha_worker_provider_settings": CHANGED}},
        extra_hosts={ghost: unreachable},
        order=[first.name, ghost],
    )
    pids = {h.name: h.main_pid() for h in fleet.hosts}
    gated = deploy(vault, repaired, captcha_kit_deploy_batch=2)

    assert gated.rc != 0
    assert gated.count("unreachable", ghost) == 1
    assert first.health()["status"] == "ok"
    assert first.main_pid() != pids[first.name]
    gate = gated.failed_results(first.name)
    assert [n for n, _ in gate] == [GATE]
    assert ghost in str(gate[0][1]["msg"])
    assert _ran(gated, second) == []
    assert second.main_pid() == pids[second.name]
    print(f"\nunhealthy host: {unhealthy.seconds:.1f} s; unreachable host: {gated.seconds:.1f} s")


def test_the_wrap_token_is_taken_on_delivery_not_at_the_restart(vault, fleet: Fleet, tmp_path):
    """The host unwraps the wrapping token in the task after its delivery, so a batch of any
    size never outlives the wrap TTL: the role's secret-id step alone, with a 30 s token, then a
    pause longer than that (a big batch's other tasks): the token was already taken, and the
    worker restarted afterwards runs on that secret-id. (Before, the token waited for the
    restart at the end of the batch and had expired by then.)"""
    role = "captcha_worker"
    playbook = tmp_path / "deliver.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Deliver a new secret-id, then let the batch take its time",
                    "hosts": "workers",
                    "gather_facts": False,
                    "vars": {
                        "captcha_worker_secret_id_rotate": True,
                        # 30 s: the delivery (three tasks) fits on a busy machine; an 8 s
                        # token expired before the unwrap once, in CI, with all lanes running.
                        "captcha_worker_secret_id_wrap_ttl": "30s",
                    },
                    "tasks": [
                        {
                            "ansible.builtin.include_role": {
                                "name": role,
                                "tasks_from": "validate.yml",
                            }
                        },
                        {
                            "ansible.builtin.include_role": {
                                "name": role,
                                "tasks_from": "secret_id.yml",
                            }
                        },
                        {"ansible.builtin.pause": {"seconds": 40}},
                    ],
                }
            ]
        )
    )
    accessor = "/var/lib/captcha-solver/secret-id.accessor"
    before = {h.name: h.sh(f"cat {accessor}").stdout.strip() for h in fleet.hosts}
    delivered = run_playbook(
        playbook,
        vault=vault,
        inventory=fleet.deployment.inventory,
        env={
            "CONTAINERS_CONF": str(CONTAINERS_CONF),
            "VAULT_TOKEN": deployer_token(vault, [fleet.deployment.dev]),
        },
        timeout=600,
    )
    assert delivered.rc == 0, delivered.failure_messages(fleet.first.name)[-3000:]
    for host in fleet.hosts:
        assert not host.exists("/var/lib/captcha-solver/secret-id.wrapped"), host.name
        taken = host.sh(f"cat {accessor}").stdout.strip()
        assert taken
        assert taken != before[host.name]
        host.sh("systemctl restart captcha-solver.service")
    for host in fleet.hosts:
        deadline = time.monotonic() + 60
        while host.health().get("status") != "ok" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert host.health()["status"] == "ok", host.health()
