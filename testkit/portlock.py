"""One test run at a time on this machine: the suites' fixed loopback ports (docs/interfaces.md)
are shared by every checkout of the kit, so a run holds a machine-wide lock while it uses them.

A second checkout's ``make test`` (or pytest session, or molecule run through make) waits for
the first one, saying whose run it waits for, instead of finding "another server uses this
port" half-way. The lock is an ``flock`` on a file in the system's temp directory: the kernel
drops it when the holder exits, however it exits, so a killed run never leaves it taken.

    python -m testkit.portlock -- COMMAND...   # run COMMAND holding the lock (the Makefile does)

Children of a holder (the stages of ``make test``, the pytest sessions they start) see
``CAPTCHA_KIT_PORTS_HELD`` and do not take it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from testkit.paths import REPO

LOCK_FILE = Path(tempfile.gettempdir()) / "captcha-kit-test-ports.lock"
HELD = "CAPTCHA_KIT_PORTS_HELD"


@contextlib.contextmanager
def hold_test_ports(wait: float = 3 * 3600) -> Iterator[None]:
    """Hold the machine's test-port lock (waiting up to ``wait`` seconds for another run)."""
    if os.environ.get(HELD):
        yield
        return
    with open(LOCK_FILE, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another run"
            print(f"testkit: the test ports are in use by {owner}; waiting", file=sys.stderr)
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"testkit: gave up waiting for {owner}") from None
                    time.sleep(2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"the tests of {REPO} (pid {os.getpid()})\n")
        fh.flush()
        os.environ[HELD] = str(REPO)
        try:
            yield
        finally:
            os.environ.pop(HELD, None)
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    with hold_test_ports():
        return subprocess.call(args)


if __name__ == "__main__":
    sys.exit(main())
