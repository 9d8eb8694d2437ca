"""Docs that run: the shell blocks of the operator docs, executed as a reader meets them.

``tests/test_docs_run.py`` runs every ``sh`` / ``bash`` / ``shell`` block of the docs in ``DOCS``
(in that order, each doc top to bottom) against a local OpenBao of its own and the CaptchaAI
emulator, with the placeholders a reader would fill filled by the run (``SUBSTITUTIONS``). A
block that cannot run here carries a marker on the line right before its fence:

    <!-- docs-test: skip (why it cannot run here) -->   not run; the reason is required
    <!-- docs-test: as vault-admin -->                   run with a Vault administrator's own
                                                         token in VAULT_TOKEN (here: the server's
                                                         root token)
    <!-- docs-test: as provisioner -->                   run with a token of the named kit policy
    <!-- docs-test: as deployer-<env> -->                (captcha-provisioner, captcha-deployer-
    <!-- docs-test: as rotator-<env> -->                 <env>, ...), made by the run
    <!-- docs-test: as stager-<env> -->

A block without a marker starts with no VAULT_TOKEN: it must obtain the token it needs itself
(an AppRole login, a token file) or need none. Each block runs in a fresh ``bash -e -o
pipefail`` from the repository root; files persist between blocks (that is how an operator's
``/tmp/policies`` or ``/etc/captcha-rotator`` reach the next block), shell variables do not.
Every fenced block of a covered doc must name its language (diagrams: ``text``), so that a
command never hides in an unlabelled block.

Placeholders filled by the run (``SUBSTITUTIONS``, applied to the block's text):

- ``inventories/<name>`` -> a copy of that inventory pointed at the local server (address, CA,
  ``vault_provision_audit_file_path``, CIDR bindings 127.0.0.1/32), as provisioning.md steps
  1-3 tell a reader to edit it; ``inventories/<env>`` -> the prod copy;
- ``<env>`` -> ``prod``; ``/tmp/`` and ``/etc/captcha-rotator`` -> directories of the run;
- ``-o``/``-g`` of ``install`` (``root``, ``captcha-rotator``) -> the user and group running the
  test (the scheduler's user is made in docs/scheduler-setup.md, a block that is skipped);
- ``127.0.0.1:18300`` / ``127.0.0.1:18301`` (the demo's emulator) -> the run's emulator;
- ``$KEY`` (a key the reader holds) -> a fresh key in the block's environment;
- ``vault`` -> the ``bao`` of the venv (the docs say they work the same way);
- ``VAULT_ADDR`` / ``VAULT_CACERT`` -> the local server, in every block's environment;
- a block that reads a key (``read -rs KEY``) gets ``$KEY`` on its stdin, as a reader types it
  (the emulator knows that key); every other block's stdin is empty;
- ``<old accessor>`` -> the accessor of the secret-id that ``/etc/captcha-rotator/secret-id``
  holds when the block starts (the one a reader replaces and then destroys).

Worker hosts (``WORKER_DOCS``): before the first block of such a doc the run starts
``WORKER_COUNT`` ``captcha-solver serve`` processes of ``prod`` on free loopback ports (each
logged in with a secret-id of ``captcha-worker-prod`` whose metadata names its host, as the
kit's deploy issues them) and points the prod copy's ``workers_prod`` group at them (local
connection, quick refresh, no systemd nudge); prod gets a first key if it has none
(provisioning.md step 5) and a staged key (scheduled-rotation.md section 2), so a rotation block
there plans a real rotation of real workers. ``DocsRun.close`` stops them.

Docs under docs/ with no operator command (``NO_OPERATOR_COMMANDS``) are checked for exactly
that: no block of theirs is marked, and every shell or unlabelled block in them only runs the
kit's own test suites (``pytest``, ``make test*``, ``make fleet``/``make bench``).

    python -m testkit.docs list              # every block: run or skipped (and why)
    python -m testkit.docs run [DOC ...]     # run them against a private server (free ports)
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import yaml

from testkit.creds import new_key, write_private
from testkit.emulator.client import EmulatorAdmin
from testkit.net import free_port
from testkit.paths import BIN, REPO
from testkit.playbook import ansible_env, process_host
from testkit.tokens import token_with
from testkit.vault import LocalVault
from testkit.worker import WorkerProc, worker_config

# The docs whose blocks run, in the order a reader meets them (the README's links, top down).
DOCS = [
    "README.md",
    "docs/tokens.md",
    "docs/provisioning.md",
    "docs/scheduler-setup.md",
    "docs/scheduled-rotation.md",
    "docs/runbooks.md",
    "docs/interfaces.md",
    "docs/design.md",
    "monitoring/README.md",
    "docs/awx.md",
    "docs/demo.md",
    "roles/vault_provision/README.md",
    "roles/captcha_worker/README.md",
]
# Docs under docs/ with no operator command, each with what it is instead: checked to hold no
# marked block and no shell block but the kit's own test commands (``test_commands_only``). A
# new doc under docs/ must be in one of the two lists.
NO_OPERATOR_COMMANDS = {
    "docs/bad-inputs.md": "a catalogue of errors, each held by the test it names",
    "docs/faults.md": "describes the fault tests (make test-faults)",
    "docs/scale.md": "sizing notes; its figures come from make fleet / make bench (bench/)",
}
# Docs whose rotation blocks run against worker processes of TEST_ENV the run starts.
WORKER_DOCS = {"docs/runbooks.md"}
WORKER_COUNT = 2
WORKER_REFRESH = 2.0  # seconds; the rotation window follows from it
SHELL_LANGS = {"sh", "bash", "shell"}
IDENTITIES = re.compile(r"^(vault-admin|provisioner|(deployer|rotator|stager)-[a-z][a-z0-9-]*)$")
TEST_ENV = "prod"
BLOCK_TIMEOUT = 180.0

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s*\((?P<reason>.*\S.*)\)$")
_AS = re.compile(r"^as\s+(?P<who>\S+)$")
# OpenBao / Vault token shapes, for the check that no block prints one.
TOKEN_RE = re.compile(r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}")
# A block that reads a key the reader types; ``<old accessor>`` and the secret-id it names.
_READS_KEY = re.compile(r"\bread\s+-\w*\s*KEY\b")
_OLD_ACCESSOR = re.compile(
    r"auth/(?P<mount>[\w-]+)/role/(?P<role>[\w-]+)/secret-id-accessor/\w+"
    r" secret_id_accessor=<old accessor>"
)
# The kit's own test commands (a doc that only shows these has no operator command).
_TEST_COMMAND = re.compile(
    r"^\(?(?:cd \S+ && )?(?:\S*/)?(?:pytest\b|make (?:test\S*|fleet|bench)\b)"
)


@dataclass
class Block:
    """One fenced block of a doc."""

    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None = None  # the marker's body, when there is one

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS

    @property
    def skip_reason(self) -> str | None:
        match = _SKIP.match(self.marker or "")
        return match.group("reason").strip() if match else None

    @property
    def identity(self) -> str | None:
        match = _AS.match(self.marker or "")
        return match.group("who") if match else None

    def marker_error(self) -> str | None:
        """What is wrong with this block's marker, or None."""
        if self.marker is None:
            return None
        if not self.is_shell:
            return f"{self.where}: a docs-test marker on a {self.lang or 'plain'} block"
        if self.skip_reason is not None:
            return None
        if self.marker.startswith("skip"):
            return f"{self.where}: a skip marker needs a reason: <!-- docs-test: skip (why) -->"
        who = self.identity
        if who is None or not IDENTITIES.match(who):
            return f"{self.where}: unknown docs-test marker {self.marker!r}"
        return None


def blocks(doc: str) -> list[Block]:
    """Every fenced block of ``doc`` (a path relative to the repository), in order."""
    lines = (REPO / doc).read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening.group("indent")), opening.group("fence")
        lang = opening.group("info").strip().split(" ")[0] if opening.group("info") else ""
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _MARKER.match(prev)
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing
                and closing.group("fence")[0] == fence[0]
                and len(closing.group("fence")) >= len(fence)
                and not closing.group("info").strip()
            ):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        out.append(
            Block(
                doc, i + 1, lang, "\n".join(body) + "\n", marker.group("body") if marker else None
            )
        )
        i = j + 1
    return out


def all_blocks(docs: list[str] | None = None) -> list[Block]:
    return [block for doc in (docs or DOCS) for block in blocks(doc)]


def commands(block: Block) -> list[str]:
    """The command lines of a block (continuations joined, comments and blanks dropped)."""
    joined = re.sub(r"\s*\\\n\s*", " ", block.text)
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def is_operator_block(block: Block) -> bool:
    """A marked block, or a shell (or unlabelled) one with a command other than the kit's own
    test suites."""
    if block.marker is not None:
        return True
    if block.lang and not block.is_shell:
        return False
    return any(not _TEST_COMMAND.match(line) for line in commands(block))


def operator_blocks(doc: str) -> list[Block]:
    """The blocks of ``doc`` that hold an operator command or a docs-test marker."""
    return [block for block in blocks(doc) if is_operator_block(block)]


# --------------------------------------------------------------------------- the run


@dataclass
class BlockRun:
    block: Block
    rc: int | None  # None: skipped
    output: str = ""
    seconds: float = 0.0


def _set_vars(path: Path, values: Mapping[str, Any]) -> None:
    data = yaml.safe_load(path.read_text()) if path.exists() else {}
    data = {**(data or {}), **values}
    path.write_text("---\n" + yaml.safe_dump(data, sort_keys=False))


@dataclass
class DocsRun:
    """The placeholders of one run and the runner of its blocks."""

    vault: LocalVault
    emulator_port: int
    emulator_admin_port: int
    workdir: Path
    secrets: list[str] = field(default_factory=list)
    workers: list[WorkerProc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tmp = self.workdir / "tmp"
        self.etc_rotator = self.workdir / "etc" / "captcha-rotator"
        self.inventories = self.workdir / "inventories"
        self.shims = self.workdir / "bin"
        self.home = self.workdir / "home"
        for directory in (self.tmp, self.etc_rotator.parent, self.shims, self.home):
            directory.mkdir(parents=True, exist_ok=True)
        vault_shim = self.shims / "vault"
        if not vault_shim.exists():
            vault_shim.symlink_to(BIN / "bao")
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.group = grp.getgrgid(os.getgid()).gr_name
        self.secrets.append(self.vault.root_token())
        self.emulator = EmulatorAdmin(f"http://127.0.0.1:{self.emulator_admin_port}")
        self._make_inventories()

    def _root(self) -> hvac.Client:
        return hvac.Client(
            url=self.vault.addr, token=self.vault.root_token(), verify=str(self.vault.ca_file)
        )

    def _make_inventories(self) -> None:
        """Each template inventory, edited as provisioning.md steps 1-3 say, for this server."""
        for name in ("dev", "staging", "prod"):
            target = self.inventories / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(REPO / "inventories" / name, target)
            _set_vars(
                target / "group_vars" / "all" / "main.yml",
                {
                    "captcha_kit_vault_addr": self.vault.addr,
                    "captcha_kit_vault_cacert": str(self.vault.ca_file),
                    "captcha_kit_provider_url": f"http://127.0.0.1:{self.emulator_port}",
                    "vault_provision_audit_file_path": str(self.vault.audit_log),
                },
            )
            host = target / "host_vars" / "localhost.yml"
            bound = {
                f"vault_provision_{who}_{what}_bound_cidrs": ["127.0.0.1/32"]
                for who in ("worker", "rotator")
                for what in ("secret_id", "token")
            }
            _set_vars(host, bound)

    def substitute(self, text: str) -> str:
        """The block as this run executes it (the placeholders of the module docstring)."""
        subs: list[tuple[str, str]] = [
            (r"(?<![\w.-])/tmp/", f"{self.tmp}/"),  # first: the paths below may be in /tmp
            (r"inventories/<env>\b", f"{self.inventories}/{TEST_ENV}"),
            (r"(?<![\w/.-])inventories/(dev|staging|prod)\b", rf"{self.inventories}/\1"),
            (r"<env>", TEST_ENV),
            (r"/etc/captcha-rotator\b", str(self.etc_rotator)),
            (r"(\binstall\b[^\n]*?)-o (root|captcha-rotator)\b", rf"\1-o {self.user}"),
            (r"(\binstall\b[^\n]*?)-g (root|captcha-rotator)\b", rf"\1-g {self.group}"),
            (r"127\.0\.0\.1:18300\b", f"127.0.0.1:{self.emulator_port}"),
            (r"127\.0\.0\.1:18301\b", f"127.0.0.1:{self.emulator_admin_port}"),
        ]
        for pattern, replacement in subs:
            text = re.sub(pattern, replacement, text)
        return text

    # ----------------------------------------------------------------- worker hosts

    def enter(self, doc: str) -> None:
        """Called before the first block of ``doc``: the worker hosts of a WORKER_DOCS doc."""
        if doc in WORKER_DOCS and not self.workers:
            self.start_workers(WORKER_COUNT)

    def start_workers(self, count: int, env: str = TEST_ENV) -> list[WorkerProc]:
        """``count`` workers of ``env`` as the prod copy's worker hosts (module docstring)."""
        admin = self._root()
        key_path = f"captchaai/{env}"
        try:
            current = admin.secrets.kv.v2.read_secret_version(
                key_path, mount_point="secret", raise_on_deleted_version=True
            )["data"]["data"]["api_key"]
        except hvac.exceptions.InvalidPath:  # provisioning.md step 5: a first key
            admin.secrets.kv.v2.create_or_update_secret(
                key_path, {"api_key": self._provider_key()}, cas=0, mount_point="secret"
            )
        else:
            self.secrets.append(current)
            self.emulator.add_key(current)
        role = f"captcha-worker-{env}"
        directory = self.workdir / "workers"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        role_id = admin.auth.approle.read_role_id(role)["data"]["role_id"]
        role_id_file = write_private(directory / "role-id", role_id + "\n")
        hosts: dict[str, Any] = {}
        for i in range(1, count + 1):
            name = f"worker-{env}-{i}"
            answer = admin.auth.approle.generate_secret_id(
                role, metadata={"host": name, "env": env}
            )["data"]
            self.secrets.append(answer["secret_id"])
            secret_id_file = write_private(
                directory / f"secret-id-{name}", answer["secret_id"] + "\n"
            )
            config = worker_config(
                env=env,
                port=free_port(),
                vault_addrs=[self.vault.addr],
                ca_file=self.vault.ca_file,
                role_id_file=role_id_file,
                secret_id_file=secret_id_file,
                provider_url=f"http://127.0.0.1:{self.emulator_port}",
                refresh_interval=WORKER_REFRESH,
                refresh_jitter=0.1,
                settings={"logging": {"level": "WARNING"}},
            )
            worker = WorkerProc(name, directory / name, config)
            self.workers.append(worker)
            worker.start(timeout=30)
            hosts[name] = {**process_host(env, worker.port), "ansible_become": False}
        inventory = self.inventories / env
        data = yaml.safe_load((inventory / "hosts.yml").read_text())
        data["all"]["children"]["workers"]["children"][f"workers_{env}"]["hosts"] = hosts
        (inventory / "hosts.yml").write_text("---\n" + yaml.safe_dump(data, sort_keys=False))
        _set_vars(
            inventory / "group_vars" / "all" / "main.yml",
            {
                "captcha_kit_refresh_interval": WORKER_REFRESH,
                "captcha_kit_refresh_jitter": 0.1,
                "key_rotation_nudge": False,  # processes, not systemd units: no reload
                "key_rotation_poll_delay": 1,
                "key_rotation_window_margin": 8,
            },
        )
        self._stage(env)
        return self.workers

    def _provider_key(self) -> str:
        """A fresh key, known to the emulator (a key the reader got from CaptchaAI)."""
        key = new_key()
        self.secrets.append(key)
        self.emulator.add_key(key)
        return key

    def _stage(self, env: str) -> None:
        """Stage a key as the stager does (scheduled-rotation.md section 2): check-and-set on
        the staged path's current version, with a token of ``captcha-stager-<env>``."""
        stager = hvac.Client(
            url=self.vault.addr,
            token=token_with(self.vault, [f"captcha-stager-{env}"]),
            verify=str(self.vault.ca_file),
        )
        path = f"captchaai-staged/{env}"
        try:
            meta = stager.secrets.kv.v2.read_secret_metadata(path, mount_point="secret")
            cas = int(meta["data"]["current_version"])
        except hvac.exceptions.InvalidPath:
            cas = 0
        stager.secrets.kv.v2.create_or_update_secret(
            path, {"api_key": self._provider_key()}, cas=cas, mount_point="secret"
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()

    # ----------------------------------------------------------------- one block

    def old_accessor(self, text: str) -> str:
        """``text`` with ``<old accessor>`` filled: the accessor of the secret-id in
        /etc/captcha-rotator/secret-id now (before the block replaces it)."""
        match = _OLD_ACCESSOR.search(text)
        if not match:
            return text
        held = (self.etc_rotator / "secret-id").read_text().strip()
        answer = self._root().auth.approle.read_secret_id(
            match.group("role"), held, mount_point=match.group("mount")
        )
        return text.replace("<old accessor>", answer["data"]["secret_id_accessor"])

    def token(self, who: str) -> str:
        """The token of ``who`` (a docs-test identity), made with the server's root token."""
        if who == "vault-admin":
            return self.vault.root_token()
        if who == "provisioner":
            # the policy of the default layout, as a Vault administrator writes it (tokens.md)
            client = self._root()
            text = (REPO / "policies" / "captcha-provisioner.hcl").read_text()
            client.sys.create_or_update_policy("captcha-provisioner", text)
            token = token_with(self.vault, ["captcha-provisioner"])
        else:
            token = token_with(self.vault, [f"captcha-{who}"])
        self.secrets.append(token)
        return token

    def env(self, block: Block) -> dict[str, str]:
        env = ansible_env(self.vault)
        env["PATH"] = f"{self.shims}{os.pathsep}{env['PATH']}"
        env["HOME"] = str(self.home)
        env["TMPDIR"] = str(self.tmp)
        key = new_key()
        self.secrets.append(key)
        env["KEY"] = key
        if block.identity:
            env["VAULT_TOKEN"] = self.token(block.identity)
        return env

    def run(self, block: Block) -> BlockRun:
        if block.skip_reason is not None:
            return BlockRun(block, None)
        script = self.workdir / "block.sh"
        script.write_text(self.old_accessor(self.substitute(block.text)))
        env = self.env(block)
        typed = ""
        if _READS_KEY.search(block.text):
            self.emulator.add_key(env["KEY"])
            typed = env["KEY"] + "\n"
        started = time.monotonic()
        try:
            proc = subprocess.run(
                ["bash", "-e", "-o", "pipefail", str(script)],
                cwd=REPO,
                env=env,
                input=typed,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=BLOCK_TIMEOUT,
                check=False,
            )
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as exc:
            rc = -1
            output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else ""
            output += f"\n(timed out after {BLOCK_TIMEOUT:.0f} s)"
        return BlockRun(block, rc, output, time.monotonic() - started)

    def leaks(self, output: str) -> list[str]:
        """What of the run's secrets (or anything shaped like a token) ``output`` holds,
        masked."""
        found = [f"***{s[-4:]}" for s in self.secrets if s and s in output]
        found += [f"a token ***{m[-4:]}" for m in TOKEN_RE.findall(output)]
        return found

    def scrub(self, output: str) -> str:
        for secret in self.secrets:
            if secret:
                output = output.replace(secret, "***" + secret[-4:])
        return TOKEN_RE.sub("***", output)


def run_docs(run: DocsRun, docs: list[str] | None = None) -> Iterator[BlockRun]:
    for doc in docs or DOCS:
        shell = [block for block in blocks(doc) if block.is_shell]
        if any(block.skip_reason is None for block in shell):
            run.enter(doc)
        for block in shell:
            yield run.run(block)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.docs", description=__doc__)
    parser.add_argument("action", choices=["list", "run"])
    parser.add_argument("docs", nargs="*", help="only these docs (default: every covered one)")
    args = parser.parse_args(argv)
    docs = args.docs or DOCS
    if args.action == "list":
        for block in all_blocks(docs):
            if block.is_shell:
                state = f"skip ({block.skip_reason})" if block.skip_reason else "run"
                who = f" as {block.identity}" if block.identity else ""
                print(f"{block.where}: {state}{who}")
        return 0
    with docs_run() as run:
        failed = sum(_report(run, run_docs(run, docs)))
    return 1 if failed else 0


@contextlib.contextmanager
def docs_run() -> Iterator[DocsRun]:
    """A DocsRun against a private OpenBao and emulator on free ports, all removed at the end."""
    from testkit.emulator import EmulatorProcess

    with tempfile.TemporaryDirectory(prefix="kit-docs-") as tmp:
        vault = LocalVault(Path(tmp) / "vault", free_port_pair())
        vault.start()
        try:
            with EmulatorProcess(free_port(), free_port()) as emu:
                run = DocsRun(vault, emu.port, emu.admin_port, Path(tmp) / "work")
                try:
                    yield run
                finally:
                    run.close()
        finally:
            vault.stop()


def _report(run: DocsRun, results: Iterator[BlockRun]) -> Iterator[bool]:
    """Print each block's result as it comes; yield True for each failed one."""
    for result in results:
        block = result.block
        if result.rc is None:
            print(f"SKIP {block.where}: {block.skip_reason}")
            continue
        leaks = run.leaks(result.output)
        ok = result.rc == 0 and not leaks
        print(f"{'ok  ' if ok else 'FAIL'} {block.where} ({result.seconds:.1f} s)", flush=True)
        if not ok:
            print(run.scrub(result.output)[-3000:], f"leaks: {leaks}" if leaks else "")
        yield not ok


def free_port_pair() -> int:
    """A loopback port whose next port is free too (an OpenBao node's API and cluster ports)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and not _taken(port + 1):
            return port
    raise RuntimeError("no free pair of loopback ports")


def _taken(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
