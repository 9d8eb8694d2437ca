"""Fixtures of the fault tests: real OpenBao servers of their own, the CaptchaAI emulator and
``captcha-solver serve`` worker processes, all on 127.0.0.1 (see docs/faults.md).

The servers are private to these tests because the tests stop them or kill their leader:
a single node in ``.state/test/faults/vault`` on 18294 and a 3-node raft cluster in
``.state/test/faults/vault-ha`` on 18262, 18272, 18282 (cluster ports +1). They stay running
after the session (the next one starts in a second); stop them with
``python -m testkit.vault stop --state-dir .state/test/faults/vault --port 18294`` and
``... --state-dir .state/test/faults/vault-ha --port 18262 --nodes 3``. A third, a 3-node
cluster with OpenBao's standby reads on (18310, 18320, 18330; ``.state/test/faults/vault-sr``),
lives for the tests of its module only.
Environment names carry a per-session tag, so sessions and tests do not disturb each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.emulator import EmulatorProcess
from testkit.faults import SESSION, provision
from testkit.net import free_port
from testkit.paths import REPO
from testkit.vault import LocalVault

SOLO_DIR = REPO / ".state" / "test" / "faults" / "vault"
SOLO_PORT = 18294
HA_DIR = REPO / ".state" / "test" / "faults" / "vault-ha"
HA_PORT = 18262
STANDBY_READS_DIR = REPO / ".state" / "test" / "faults" / "vault-sr"
STANDBY_READS_PORT = 18310


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/faults/ carries the ``faults`` marker."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def solo_vault() -> Iterator[LocalVault]:
    """The faults' single node; stopped at the end of the session (pass or fail)."""
    server = LocalVault(SOLO_DIR, SOLO_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ha_vault() -> Iterator[LocalVault]:
    """The faults' 3-node cluster; stopped at the end of the session (pass or fail)."""
    cluster = LocalVault(HA_DIR, HA_PORT, nodes=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def standby_reads_vault() -> Iterator[LocalVault]:
    """A 3-node cluster whose standbys answer reads from their own copy (OpenBao's default,
    ``disable_standby_reads = false``); stopped after the tests of its module."""
    cluster = LocalVault(STANDBY_READS_DIR, STANDBY_READS_PORT, nodes=3, standby_reads=True)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def ha(ha_vault: LocalVault) -> Iterator[LocalVault]:
    """The HA cluster with every node up (a killed node is restarted and rejoined after)."""
    ha_vault.start()
    yield ha_vault
    ha_vault.start()


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorProcess]:
    # Ban after 20 bad-key requests a minute, as the real service does: no test may reach it.
    with EmulatorProcess(free_port(), free_port(), solve_delay="fixed:0.2") as emu:
        yield emu


@pytest.fixture(scope="session")
def solo_envs(solo_vault: LocalVault, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    names = [f"f{SESSION}-s{i}" for i in range(1, 4)]
    run = provision(solo_vault, names, tmp_path_factory.mktemp("provision-solo"))
    assert run.rc == 0, run.output[-3000:]
    return names


@pytest.fixture(scope="session")
def ha_envs(ha_vault: LocalVault, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    names = [f"f{SESSION}-h{i}" for i in range(1, 4)]
    ha_vault.start()
    run = provision(ha_vault, names, tmp_path_factory.mktemp("provision-ha"), ha_vault.addrs)
    assert run.rc == 0, run.output[-3000:]
    return names
