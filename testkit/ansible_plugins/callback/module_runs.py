"""Cheaper module runs in the test runs: bytecode in the module payloads, and module processes
that read their code buffered. The modules and what they do are unchanged.

**Bytecode.** ansible-core 2.19 sends a module with every ``module_utils`` file it imports as
source in a zip (AnsiballZ), and Python's zipimport compiles source from a zip on every import:
about 0.15 CPU-s of a 0.26 CPU-s ``stat`` run, in each of the few thousand module runs of ``make
test`` (docs/design.md, "Where the test run's CPU goes"). zipimport prefers a ``.pyc`` entry
beside the ``.py`` one, so this plugin adds one for every Python file of the payload: compiled
once per source on the controller (cached under ``.state/test/ansiballz-pyc``) as an unchecked
hash-based pyc (PEP 552), which zipimport loads without looking at a timestamp. The test hosts
run Debian's Python 3.11 like the controller; on a host whose Python has another bytecode magic
number, zipimport skips the ``.pyc`` entry and compiles the ``.py`` one, as without this plugin.

**Buffered reads.** With pipelining (the kit's ``ansible.cfg``) a module process reads its code
from stdin, and with ``PYTHONUNBUFFERED`` set (the test machines set it, so that a stage's log and
ansible-playbook's task headers come as they happen) Python reads it one byte per ``read(2)``: a
0.2 MB payload costs 0.1 s of system time per local module run, more with the bytecode. The plugin
removes the variable from ansible-playbook's environment after Python has read it, so its own
output stays unbuffered and the processes it starts on the controller (local module runs) read
buffered. Hosts reached over SSH never get it.

It is a test-run measure, enabled by ``testkit.playbook.MODULE_RUNS_ENV`` (``make test`` and the
test kit's ``ansible-playbook`` runs); the kit's ``ansible.cfg``, which operators use, does not
enable it. It wraps two functions of ``ansible.executor.module_common`` and refuses to load on an
ansible-core it was not written for, so an upgrade cannot silently change it.
"""

from __future__ import annotations

import hashlib
import importlib._bootstrap_external as bootstrap_external
import importlib.util
import inspect
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ansible.errors import AnsibleError
from ansible.executor import module_common
from ansible.plugins.callback import CallbackBase
from ansible.release import __version__ as ansible_version

DOCUMENTATION = """
    name: module_runs
    type: aggregate
    short_description: cheaper module runs in the test runs
    description:
      - Adds an unchecked hash-based pyc for every Python file of an AnsiballZ payload.
      - Removes PYTHONUNBUFFERED from the environment of the processes ansible-playbook starts.
    requirements:
      - enabled in callbacks_enabled
"""

SUPPORTED = "2.19."
CACHE_DIR = Path(__file__).resolve().parents[3] / ".state" / "test" / "ansiballz-pyc"


def _bytecode(name: str, source: bytes) -> bytes | None:
    """The pyc of ``source`` (compiled as ``name``), from the cache or compiled now; None when
    the source does not compile (the module then fails on the host as it would without it)."""
    key = hashlib.sha256(
        bootstrap_external.MAGIC_NUMBER + name.encode() + b"\0" + source
    ).hexdigest()
    cached = CACHE_DIR / f"{key}.pyc"
    try:
        return cached.read_bytes()
    except FileNotFoundError:
        pass
    try:
        code = compile(source, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None
    pyc = bytes(
        bootstrap_external._code_to_hash_pyc(  # type: ignore[attr-defined]
            code, importlib.util.source_hash(source), checked=False
        )
    )
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        out.write(pyc)
    os.replace(tmp, cached)
    return pyc


class _WithBytecode:
    """A module payload's zip that writes a ``.pyc`` entry after each ``.py`` one."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._zf, name)

    def writestr(
        self, zinfo: zipfile.ZipInfo, data: str | bytes, *args: Any, **kwargs: Any
    ) -> None:
        self._zf.writestr(zinfo, data, *args, **kwargs)
        if not zinfo.filename.endswith(".py"):
            return
        source = data.encode() if isinstance(data, str) else bytes(data)
        pyc = _bytecode(zinfo.filename, source)
        if pyc is not None:
            entry = zipfile.ZipInfo(zinfo.filename + "c", zinfo.date_time)
            entry.compress_type = zinfo.compress_type
            self._zf.writestr(entry, pyc)


def _wrap(function: Any) -> Any:
    if getattr(function, "_with_bytecode", False):
        return function
    if "zf" not in inspect.signature(function).parameters:
        raise AnsibleError(f"module_runs: {function.__name__} takes no zf any more")

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.arguments["zf"] = _WithBytecode(bound.arguments["zf"])
        return function(*bound.args, **bound.kwargs)

    wrapped._with_bytecode = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


def install() -> None:
    """Wrap the two functions that write Python files into a payload (idempotent), and start
    the module processes without PYTHONUNBUFFERED."""
    if not ansible_version.startswith(SUPPORTED):
        raise AnsibleError(
            f"module_runs was written for ansible-core {SUPPORTED}x, not {ansible_version}:"
            " check module_common's payload writing and update or remove this test plugin"
        )
    module_common.recursive_finder = _wrap(module_common.recursive_finder)
    module_common._add_module_to_zip = _wrap(module_common._add_module_to_zip)
    os.environ.pop("PYTHONUNBUFFERED", None)


class CallbackModule(CallbackBase):
    """Installs the wrapper when ansible-playbook loads its callbacks, before any task runs
    (and so before the worker processes fork)."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "module_runs"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install()
