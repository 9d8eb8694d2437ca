"""testkit/loadgen.py counts what it sees: failures per worker, and its bounds hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from testkit.loadgen import LoadGenerator, check_url
from testkit.net import free_port
from testkit.paths import REPO


def test_refused_requests_are_counted_as_failed_per_worker():
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    load = LoadGenerator(dead, clients=2, duration=5, max_requests=10, timeout=2).start()
    load.wait()
    summary = load.summary()
    assert summary["attempted"] == 10
    assert summary["failed"] == 10
    assert summary["ok"] == 0
    for url in dead:
        assert summary["workers"][url]["attempted"] == 5
        assert set(summary["workers"][url]["errors"]) == {"URLError"}


def test_cli_exit_status_and_json_summary(tmp_path):
    out = tmp_path / "summary.json"
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "testkit.loadgen", "--worker", url, "--duration", "3"),
            *("--max-requests", "3", "--timeout", "2", "--out", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(out.read_text())["failed"] == 3
    assert json.loads(proc.stdout)["workers"][url]["failed"] == 3


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:8080", "https://127.0.0.1:1", "http://127.0.0.1", "ftp://localhost:2"]
)
def test_only_loopback_http_urls_are_accepted(url):
    with pytest.raises(ValueError, match="loopback"):
        check_url(url)
