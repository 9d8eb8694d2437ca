"""The test kit's host helpers that need no container."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from testkit.hosts import ssh_key


def test_stages_starting_together_share_one_ssh_key(tmp_path: Path) -> None:
    """make test's lanes start at once and each may be the first to need the hosts' key: one
    of them makes it, the others wait for it and get the same pair."""
    path = tmp_path / "ssh" / "id_ed25519"
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: ssh_key(path), range(8)))
    assert made == [path] * 8
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[:2]
    assert Path(f"{path}.pub").read_text().split()[:2] == derived
    assert path.stat().st_mode & 0o777 == 0o600
