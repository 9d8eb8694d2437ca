"""Run the stages of `make test` in four lanes and print each stage's wall time at the end.

    python tests/stages.py            # what `make test` runs (after the venv and the image)
    python tests/stages.py --list     # the lanes and their stages

The suites run in four lanes that share no port and no container name (docs/interfaces.md):
the vault_provision molecule scenario, the playbook suites under tests/ but the rotation ones,
then some worker-host suites, in one; YAML and Ansible lint, the collections' unit tests, the
monitoring / collection / execution-environment checks, the fault tests (all but the slow ones:
`make test-faults`) and the two worker-host molecule scenarios in the second; the solver
package, the other worker-host suites and the operator's-path rotation suites in the third;
the secret-id lifecycle under compressed TTLs (minutes of waiting for expiries, little CPU),
the other rotation suites and the Python lint in the fourth (the rotation suites run
worker processes on free ports and emulators of their own, under env names of their own per
session, so their two stages can run side by side). A fifth lane only builds ansible-test's
sanity environments (pip installs) for the ops stage of the second, which starts after it. On
2 cores the run is CPU-bound (the closing table gives each stage's CPU time and the
machine's): the lanes keep both cores busy to the end, and are about equally long. All use
the shared test OpenBao on 18250, which is started here first, so that no two stages race to
initialise it, and stopped here at the end, pass or fail, with the emulator the scenarios
share. The whole run holds the machine's test-port lock (testkit.portlock): a second
checkout's run waits for this one.

Each stage's output goes to ``.state/test/logs/<stage>.log``; a stage that fails has its whole
log printed, one that passes its closing lines. The exit status is 0 only when every stage
passed.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from testkit.playbook import MODULE_RUNS_ENV
from testkit.portlock import hold_test_ports

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOG_DIR = REPO / ".state" / "test" / "logs"
TESTBED = REPO / "molecule" / "shared" / "testbed.py"
# The collections' unit tests (seconds, no server): plans, decide(), normalisers, filters; and
# the worker role's own module (its host probe).
COLLECTION_TESTS = [
    "collections/ansible_collections/captcha_kit/vault/tests/unit",
    "collections/ansible_collections/captcha_kit/captchaai/tests/unit",
    "roles/captcha_worker/tests/unit",
]


@dataclass
class Stage:
    name: str
    argv: list[str]
    cwd: Path = REPO
    # Stages of other lanes this one starts after (it waits for them to end, pass or fail).
    after: list[Stage] = field(default_factory=list)
    rc: int | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    summary: str = ""
    log: Path = field(init=False)
    done: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.log = LOG_DIR / f"{self.name}.log"


def _bin(name: str) -> str:
    return str(BIN / name)


# The suites that deploy worker hosts (systemd containers over SSH) run in lanes of their own.
HOST_SUITES_A = [
    "tests/test_worker_lifecycle.py",
    "tests/test_worker_bad_inputs.py",
    "tests/test_worker_redeploy.py",
]
HOST_SUITES_B = [
    "tests/test_worker_local_api.py",
    "tests/test_leak_scan.py",
]
# Lane 2, after the unit tests: promtool rule tests and the metric-name check against a worker
# process, the rotation's textfile metrics, the collection build / install / sanity and the
# execution environment's build context (about a minute; ansible-test's venvs are cached).
OPS_SUITES = [
    "tests/test_monitoring.py",
    "tests/test_rotation_textfile.py",
    "tests/test_collection_build.py",
]


# Lane 4: a worker host's secret-ids expiring under a compressed schedule (marked `long`: the
# other stages deselect it), then the rotation suites (each env, emulator and worker fleet of
# its own). They run as two stages of about the same length, one at the end of lane 3, so that
# the lanes end together: the operator's-path ones, and the others.
LIFECYCLE_SUITE = "tests/test_secret_id_lifecycle.py"
ROTATION_SUITES = sorted(
    str(path.relative_to(REPO))
    for path in (REPO / "tests").glob("test_rotation_*.py")
    if str(path.relative_to(REPO)) not in OPS_SUITES
)
ROTATION_OPERATOR_SUITES = [
    "tests/test_rotation_bad_inputs.py",
    "tests/test_rotation_interactive.py",
    "tests/test_rotation_operator_path.py",
]


def lanes() -> list[list[Stage]]:
    """Four lanes of about the same length, measured on 2 cores (docs/design.md), and the
    sanity environments' lane."""
    pytest = _bin("pytest")
    hosts = HOST_SUITES_A + HOST_SUITES_B
    ignore = [
        f"--ignore={path}" for path in [*hosts, *OPS_SUITES, *ROTATION_SUITES, "tests/faults"]
    ]
    playbooks = Stage("playbooks", [pytest, "tests", *ignore, "-m", "not long"])
    lint = [
        Stage("lint-yaml", [_bin("yamllint"), "--strict", "."]),
        Stage("lint-ansible", [_bin("ansible-lint"), "--profile", "production"]),
    ]
    lint_python = Stage("lint-python", ["make", "--no-print-directory", "lint-python"])
    units = Stage("collection-units", [pytest, *COLLECTION_TESTS])
    # ansible-test's sanity environments (pip installs, ~30 CPU-s, little else) are built beside
    # the lanes; the stage that runs the sanity tests starts after them (testkit/sanity.py).
    sanity_venvs = Stage("sanity-venvs", [sys.executable, "-m", "testkit.sanity", "prime"])
    ops = Stage("ops-monitoring-collection", [pytest, *OPS_SUITES], after=[sanity_venvs])
    solver = Stage("solver", [pytest], cwd=REPO / "solver")
    faults = Stage("faults", [pytest, "tests/faults", "-m", "not slow_faults"])
    scenarios = ("vault_provision", "captcha_worker", "key_rotation")
    provision_scenario, *worker_scenarios = (
        Stage(f"molecule-{s}", [_bin("molecule"), "test", "-s", s]) for s in scenarios
    )
    hosts_a = Stage("hosts-a", [pytest, *HOST_SUITES_A, "-m", "not long"])
    hosts_b = Stage("hosts-b", [pytest, *HOST_SUITES_B])
    # -rP: the test's figures (runs, re-issues, solves, the warning's lead) go into the log.
    lifecycle = Stage("secret-id-lifecycle", [pytest, LIFECYCLE_SUITE, "-rP"])
    operator = [suite for suite in ROTATION_SUITES if suite in ROTATION_OPERATOR_SUITES]
    others = [suite for suite in ROTATION_SUITES if suite not in ROTATION_OPERATOR_SUITES]
    rotation_operator = Stage("rotation-operator", [pytest, *operator])
    rotation = Stage("rotation", [pytest, *others])
    # The vault_provision scenario opens lane 1: it is over (under a minute) long before lane
    # 2 reaches the other scenarios, so no two scenarios ever run at once; lint-python closes
    # lane 4, whose first stage mostly waits. Lane 2 ended last by 40 to 320 s in every run
    # before (it ends with two scenarios that mostly wait, so the machine was half idle then).
    return [
        [provision_scenario, playbooks, hosts_b],
        [*lint, units, ops, faults, *worker_scenarios],
        [solver, hosts_a, rotation_operator],
        [lifecycle, rotation, lint_python],
        [sanity_venvs],
    ]


def _summary(log: Path) -> str:
    """The closing line of a pytest or molecule run, if the log has one."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in reversed(lines):
        text = line.strip().strip("=").strip()
        if " passed" in text or " failed" in text or " error" in text:
            return text
    return lines[-1].strip() if lines else ""


def _failure_digest(log: Path, limit: int = 40) -> list[str]:
    """What a reader of CI's last lines needs of a failed stage: pytest's short test summary
    (one line per failed or erroring test, with its error), or else the log's closing lines."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    marks = [i for i, line in enumerate(lines) if "short test summary info" in line]
    digest = lines[marks[-1] + 1 :] if marks else lines[-limit:]
    return [line[:300] for line in digest[:limit]]


def run_stage(stage: Stage, lock: threading.Lock) -> None:
    for before in stage.after:
        before.done.wait()
    started = time.monotonic()
    env = {**os.environ, "NO_COLOR": "1", "PY_COLORS": "0", "ANSIBLE_NOCOLOR": "1"}
    with stage.log.open("wb") as out:
        proc = subprocess.Popen(stage.argv, cwd=stage.cwd, env=env, stdout=out, stderr=out)
        # wait4: the CPU time of the stage's process tree (what it waited for; not the
        # containers' processes, which podman's conmon holds, nor the shared OpenBao).
        _, wait_status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
    stage.rc = proc.returncode
    stage.seconds = time.monotonic() - started
    stage.cpu_seconds = usage.ru_utime + usage.ru_stime
    stage.summary = _summary(stage.log)
    with lock:
        status = "ok" if stage.rc == 0 else f"FAILED (exit {stage.rc})"
        print(
            f"\n===== {stage.name}: {status} in {stage.seconds:.0f} s"
            f" ({stage.cpu_seconds:.0f} s CPU)",
            flush=True,
        )
        text = stage.log.read_text(errors="replace")
        if stage.rc != 0:
            print(text, flush=True)
        else:
            print("\n".join(text.splitlines()[-12:]), flush=True)


def _machine_cpu_seconds() -> float:
    """User + system CPU time of the whole machine so far (/proc/stat), containers included."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def run_lane(lane: list[Stage], lock: threading.Lock) -> None:
    for stage in lane:
        try:
            run_stage(stage, lock)
        finally:
            stage.done.set()


def start_testbed() -> None:
    subprocess.run([sys.executable, str(TESTBED), "vault-start"], cwd=REPO, check=True)


def stop_testbed() -> None:
    subprocess.run([sys.executable, str(TESTBED), "emulator-stop"], cwd=REPO, check=False)
    state_dir = REPO / ".state" / "test" / "vault"
    stop = ["stop", "--state-dir", str(state_dir), "--port", "18250"]
    subprocess.run([sys.executable, "-m", "testkit.vault", *stop], cwd=REPO, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the lanes and stop")
    args = parser.parse_args(argv)
    plan = lanes()
    if args.list:
        for i, lane in enumerate(plan, 1):
            print(f"lane {i}: " + " -> ".join(s.name for s in lane))
        return 0
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # Every stage's ansible-playbook runs, molecule's included (testkit.playbook).
    os.environ.update(MODULE_RUNS_ENV)
    # The repository's own Python, compiled once: a machine that sets PYTHONDONTWRITEBYTECODE
    # (this one does) would otherwise compile it in every worker, tool and pytest process.
    compileall.compile_dir(REPO / "solver" / "src", quiet=1)
    compileall.compile_dir(REPO / "testkit", quiet=1)
    started = time.monotonic()
    cpu_started = _machine_cpu_seconds()
    lock = threading.Lock()
    with hold_test_ports(), contextlib.ExitStack() as stop:
        stop.callback(stop_testbed)
        start_testbed()
        threads = [threading.Thread(target=run_lane, args=(lane, lock)) for lane in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    total = time.monotonic() - started
    machine_cpu = _machine_cpu_seconds() - cpu_started
    stages = [s for lane in plan for s in lane]
    print("\n| stage | lane | wall time | CPU time | result |\n|---|---|---|---|---|")
    for i, lane in enumerate(plan, 1):
        for s in lane:
            result = "ok" if s.rc == 0 else f"exit {s.rc}"
            print(
                f"| {s.name} | {i} | {s.seconds:.0f} s | {s.cpu_seconds:.0f} s"
                f" | {result}: {s.summary[:70]} |"
            )
    print(
        f"| all ({len(plan)} lanes in parallel) | | {total:.0f} s"
        f" | {machine_cpu:.0f} s (machine, {os.cpu_count()} cores) | |"
    )
    failed = [s.name for s in stages if s.rc != 0]
    for s in stages:
        if s.rc != 0:
            print(f"\n----- {s.name} failed (whole log above and in {s.log.relative_to(REPO)}):")
            print("\n".join(_failure_digest(s.log)))
    print(f"stages: {len(stages) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
