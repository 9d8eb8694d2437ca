"""Where a suite spends CPU: pytest hooks that add each test's CPU time (the pytest process and
every child it waited for: ansible-playbook and its forks, worker processes, emulators) and
print the 15 largest at the end, beside pytest's ``--durations``. The worker containers and the
OpenBao servers are not children, so their CPU is not counted (tests/stages.py prints the
machine's). Import the hooks into a suite's top conftest.py."""

from __future__ import annotations

import resource
from collections import defaultdict
from collections.abc import Iterator

import pytest

_CPU: defaultdict[str, float] = defaultdict(float)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    before = _cpu_seconds()
    yield
    _CPU[item.nodeid] += _cpu_seconds() - before


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _CPU:
        return
    terminalreporter.write_sep("=", "largest CPU times (the test's process tree)")
    for nodeid, seconds in sorted(_CPU.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{seconds:7.2f}s cpu  {nodeid}")
    terminalreporter.write_line(f"{sum(_CPU.values()):7.2f}s cpu  all {len(_CPU)} tests")
