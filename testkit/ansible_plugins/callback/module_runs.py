"""Cheaper module runs in the test runs: bytecode in the module payloads, each module's
module_utils set found once, module processes that read their code buffered, filter plugins
loaded once per run instead of once per task, template code generated once, and local module
processes forked from a warm interpreter. The modules and what they do are unchanged.

**Bytecode.** ansible-core 2.19 sends a module with every ``module_utils`` file it imports as
source in a zip (AnsiballZ), and Python's zipimport compiles source from a zip on every import:
about 0.15 CPU-s of a 0.26 CPU-s ``stat`` run, in each of the few thousand module runs of ``make
test`` (docs/design.md, "Where `make test` spends its time"). zipimport prefers a ``.pyc`` entry
beside the ``.py`` one, so this plugin adds one for every Python file of the payload: compiled
once per source on the controller (cached under ``.state/test/ansiballz-pyc``) as an unchecked
hash-based pyc (PEP 552), which zipimport loads without looking at a timestamp. The test hosts
run Debian's Python 3.11 like the controller; on a host whose Python has another bytecode magic
number, zipimport skips the ``.pyc`` entry and compiles the ``.py`` one, as without this plugin.

**The module_utils set, found once.** Each ansible-playbook run finds again which module_utils
files a module needs (parsing the module and each of those files) the first time it runs that
module: about 0.1 CPU-s per module and run, and the test suites make hundreds of runs. The
plugin keeps what it found under ``.state/test/ansiballz-finder`` (keyed by ansible-core, the
module's content and the module_utils and collection search paths) and writes the kept set into
the next run's payload while every file of it is byte-for-byte unchanged; otherwise it finds
them again. A set with a generated redirect shim is never kept, so a redirect's deprecation
warning still shows.

**Buffered reads.** With pipelining (the kit's ``ansible.cfg``) a module process reads its code
from stdin, and with ``PYTHONUNBUFFERED`` set (tests/stages.py and testkit set it, so that a
stage's log and ansible-playbook's task headers come as they happen) Python reads it one byte
per ``read(2)``: a 0.2 MB payload costs 0.1 s of system time per local module run, more with the
bytecode. The plugin
removes the variable from ansible-playbook's environment after Python has read it, so its own
output stays unbuffered and the processes it starts on the controller (local module runs) read
buffered. Hosts reached over SSH never get it.

**Filter and test plugins, loaded once.** Each task runs in a worker process forked from
ansible-playbook, and a worker loads every filter and test plugin file of the search path on its
first template with a filter, again in every task. The plugin loads them in ansible-playbook
when a task starts (after the play's plugin directories were added, which clear the loader's
cache), and the workers inherit them.

**Template code, generated once.** Each worker process compiles the templates of its task again
(Jinja parses each and generates Python code for it): the largest part of a worker's own CPU
after the module payload. The plugin keeps the generated code under ``.state/test/jinja-code``,
keyed by ansible-core, Jinja, the template (or expression) source, the environment settings
code generation reads (delimiters a template header can change, whitespace options) and
Ansible's backslash escaping, and stores beside it each filter and test the code calls and how
(with the context, the environment or neither). A compile reuses the code while each of those is
still there and called the same way; otherwise it generates it again.

**Local modules forked from a warm interpreter.** A module run on the controller (the kit's
Vault modules) starts a new Python that imports ``ansible.module_utils.basic``, hvac and
requests before the module's code: about 0.3 CPU-s per run. The plugin starts a server per
ansible-playbook run (testkit/warm_modules.py) that imports them once, and the local
connection forks each plain pipelined module run from it: the same payload, working directory,
environment and exit status; become, a module file on disk or another interpreter run as
before. ansible-playbook stops the server and waits for it when the playbook ends.

It is a test-run measure, enabled by ``testkit.playbook.MODULE_RUNS_ENV`` (``make test`` and the
test kit's ``ansible-playbook`` runs); the kit's ``ansible.cfg``, which operators use, does not
enable it. It wraps two functions of ``ansible.executor.module_common`` (``recursive_finder``
and ``_add_module_to_zip``), three methods of Ansible's Jinja environment (``compile``,
``_generate``, ``compile_expression``) and the local connection's ``exec_command``, and
refuses to load on an ansible-core it was not written for, so an upgrade cannot silently
change it.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import hashlib
import importlib._bootstrap_external as bootstrap_external
import importlib.util
import inspect
import json
import marshal
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import jinja2
from ansible._internal._datatag._tags import Origin
from ansible._internal._templating._jinja_bits import AnsibleEnvironment, _TemplateCompileContext
from ansible._internal._templating._jinja_common import _TemplateConfig
from ansible.errors import AnsibleError
from ansible.executor import module_common
from ansible.plugins.callback import CallbackBase
from ansible.plugins.connection import ConnectionBase
from ansible.plugins.connection import local as local_connection
from ansible.plugins.loader import filter_loader, test_loader
from ansible.release import __version__ as ansible_version
from ansible.utils.collection_loader import AnsibleCollectionConfig
from jinja2 import nodes
from jinja2.utils import _PassArg

from testkit import warm_modules

DOCUMENTATION = """
    name: module_runs
    type: aggregate
    short_description: cheaper module runs in the test runs
    description:
      - Adds an unchecked hash-based pyc for every Python file of an AnsiballZ payload.
      - Removes PYTHONUNBUFFERED from the environment of the processes ansible-playbook starts.
      - Loads the filter and test plugins in ansible-playbook before each task's worker forks.
      - Keeps the code Jinja generates for a template and reuses it while the filters and tests
        it calls are called the same way.
      - Forks plain pipelined local module runs from a warm interpreter (testkit/warm_modules.py).
    requirements:
      - enabled in callbacks_enabled
"""

SUPPORTED = "2.19."
STATE = Path(__file__).resolve().parents[3] / ".state" / "test"
CACHE_DIR = STATE / "ansiballz-pyc"
FINDER_DIR = STATE / "ansiballz-finder"
TEMPLATE_DIR = STATE / "jinja-code"


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
    """A module payload's zip that writes a ``.pyc`` entry after each ``.py`` one, and notes
    what it was given (name, content, the file it came from) for the finder cache."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf
        self.written: list[tuple[str, bytes, str | None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._zf, name)

    def writestr(
        self, zinfo: zipfile.ZipInfo, data: str | bytes, *args: Any, **kwargs: Any
    ) -> None:
        self._zf.writestr(zinfo, data, *args, **kwargs)
        source = data.encode() if isinstance(data, str) else bytes(data)
        origin = Origin.get_tag(data)
        self.written.append((zinfo.filename, source, origin.path if origin else None))
        if not zinfo.filename.endswith(".py"):
            return
        pyc = _bytecode(zinfo.filename, source)
        if pyc is not None:
            entry = zipfile.ZipInfo(zinfo.filename + "c", zinfo.date_time)
            entry.compress_type = zinfo.compress_type
            self._zf.writestr(entry, pyc)


def _wrap(function: Any) -> Any:
    if getattr(function, "_module_runs", False):
        return function
    signature = inspect.signature(function)
    if "zf" not in signature.parameters:
        raise AnsibleError(f"module_runs: {function.__name__} takes no zf any more")

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["zf"] = _WithBytecode(bound.arguments["zf"])
        return function(*bound.args, **bound.kwargs)

    wrapped._module_runs = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


def _finder_key(module_fqn: str, module_data: str | bytes) -> str:
    """What a module's ``module_utils`` set depends on but their contents (checked on use)."""
    data = module_data.encode() if isinstance(module_data, str) else bytes(module_data)
    paths = module_common.module_utils_loader._get_paths(subdirs=False)
    parts = [
        ansible_version,
        bootstrap_external.MAGIC_NUMBER.hex(),
        module_fqn,
        hashlib.sha256(data).hexdigest(),
        *paths,
        "--",
        *AnsibleCollectionConfig.collection_paths,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _cached_finding(key: str) -> tuple[list[tuple[str, bytes, str | None]], Any] | None:
    """A finder result of an earlier run, if every file it took is still the same."""
    try:
        kept = json.loads((FINDER_DIR / f"{key}.json").read_text())
        written = [(name, base64.b64decode(data), path) for name, data, path in kept["written"]]
        metadata = module_common.ModuleMetadataV1(**kept["metadata"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    for _, data, path in written:
        if path is not None:
            try:
                if Path(path).read_bytes() != data:
                    return None
            except OSError:
                return None
    return written, metadata


def _keep_finding(key: str, written: list[tuple[str, bytes, str | None]], metadata: Any) -> None:
    # Only files of known origin, and the empty or generated package __init__ files between them.
    if any(path is None and not name.endswith("__init__.py") for name, _, path in written):
        return
    if type(metadata) is not module_common.ModuleMetadataV1:
        return
    kept = {
        "written": [(name, base64.b64encode(data).decode(), path) for name, data, path in written],
        "metadata": dataclasses.asdict(metadata),
    }
    FINDER_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=FINDER_DIR, suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump(kept, out)
    os.replace(tmp, FINDER_DIR / f"{key}.json")


def _cached_finder(function: Any) -> Any:
    """``recursive_finder`` that writes the module_utils set an earlier run found for the same
    module, when every file of it is unchanged; else it finds them (parsing each file) and
    keeps the result."""
    if getattr(function, "_module_runs", False):
        return function
    signature = inspect.signature(function)
    expected = ["name", "module_fqn", "module_data", "zf", "date_time", "extension_manager"]
    if list(signature.parameters) != expected:
        raise AnsibleError(f"module_runs: recursive_finder takes {list(signature.parameters)}")

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs).arguments
        zf = _WithBytecode(given["zf"])
        extensions = given["extension_manager"]
        if extensions.debugger_enabled or extensions.extension_names:
            return function(**(given | {"zf": zf}))
        key = _finder_key(given["module_fqn"], given["module_data"])
        found = _cached_finding(key)
        if found is not None:
            written, metadata = found
            for name, data, _ in written:
                zf.writestr(module_common._make_zinfo(name, given["date_time"], zf=zf._zf), data)
            return metadata
        metadata = function(**(given | {"zf": zf}))
        _keep_finding(key, zf.written, metadata)
        return metadata

    wrapped._module_runs = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


# --------------------------------------------------------------------------- templates

# What Jinja's code generation reads of an environment besides the template (the overlay
# settings a template header can change, and the ones Ansible fixes).
_ENV_SETTINGS = (
    "block_start_string",
    "block_end_string",
    "variable_start_string",
    "variable_end_string",
    "comment_start_string",
    "comment_end_string",
    "line_statement_prefix",
    "line_comment_prefix",
    "trim_blocks",
    "lstrip_blocks",
    "newline_sequence",
    "keep_trailing_newline",
    "optimized",
    "autoescape",
    "is_async",
)
# The key of the template or expression the current compile is for (set by the wrappers).
_COMPILING: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "module_runs_compiling", default=None
)
# The filters and tests the code generation of the current compile looked up.
_LOOKED_UP: contextvars.ContextVar[list[tuple[str, str, str | None]] | None] = (
    contextvars.ContextVar("module_runs_looked_up", default=None)
)


def _pass_arg(function: Any) -> str | None:
    """How the generated code calls a filter or test: "missing" when there is none."""
    if function is None:
        return "missing"
    passed = _PassArg.from_obj(function)
    return passed.name if passed is not None else None


def _template_key(env: Any, what: tuple[str, ...], name: Any, filename: Any, defer: bool) -> str:
    compiling = _TemplateCompileContext.current(optional=True)
    parts = [
        ansible_version,
        jinja2.__version__,
        bootstrap_external.MAGIC_NUMBER.hex(),
        f"{type(env).__module__}.{type(env).__qualname__}",
        f"{env.code_generator_class.__module__}.{env.code_generator_class.__qualname__}",
        repr(tuple(getattr(env, setting) for setting in _ENV_SETTINGS)),
        repr(sorted(env.extensions)),
        repr(_TemplateConfig.allow_embedded_templates),
        repr(compiling.escape_backslashes if compiling else None),
        repr((name, filename, defer)),
        *what,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _kept_code(env: Any, key: str) -> Any:
    """Code an earlier compile of the same template kept, if every filter and test it calls is
    still there and called the same way; else None."""
    try:
        # The plugin's own files, written below (as Python reads a __pycache__).
        code, looked_up = marshal.loads((TEMPLATE_DIR / f"{key}.code").read_bytes())  # noqa: S302
    except (FileNotFoundError, EOFError, ValueError, TypeError):
        return None
    for kind, name, passed in looked_up:
        if _pass_arg(getattr(env, kind).get(name)) != passed:
            return None
    return code


def _keep_code(key: str, code: Any, looked_up: list[tuple[str, str, str | None]]) -> None:
    TEMPLATE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=TEMPLATE_DIR, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        out.write(marshal.dumps((code, looked_up)))
    os.replace(tmp, TEMPLATE_DIR / f"{key}.code")


def _cached_compile(function: Any) -> Any:
    """``Environment.compile`` that reuses the code an earlier process generated for the same
    template source (or expression), environment settings and filter and test calls."""
    if getattr(function, "_module_runs", False):
        return function

    def wrapped(
        self: Any,
        source: Any,
        name: Any = None,
        filename: Any = None,
        raw: bool = False,
        defer_init: bool = False,
    ) -> Any:
        what = _COMPILING.get()
        _COMPILING.set(None)  # for this compile only, not for one it may start
        if isinstance(source, str):
            what = ("template", source.encode().decode())
        elif not isinstance(source, nodes.Template):
            what = None
        if raw or what is None or self._debuggable_template_source:
            return function(self, source, name, filename, raw, defer_init)
        key = _template_key(self, what, name, filename, defer_init)
        code = _kept_code(self, key)
        if code is not None:
            return code
        looked_up: list[tuple[str, str, str | None]] = []
        token = _LOOKED_UP.set(looked_up)
        try:
            code = function(self, source, name, filename, raw, defer_init)
        finally:
            _LOOKED_UP.reset(token)
        _keep_code(key, code, looked_up)
        return code

    wrapped._module_runs = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


def _noting_generate(function: Any) -> Any:
    """``Environment._generate`` that notes the filters and tests the generated code calls and
    how (what it depends on besides the template and the environment's settings)."""
    if getattr(function, "_module_runs", False):
        return function

    def wrapped(self: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up = _LOOKED_UP.get()
        if looked_up is not None:
            _LOOKED_UP.set(None)
            for kind, node_type in (("filters", nodes.Filter), ("tests", nodes.Test)):
                for node in source.find_all(node_type):
                    function_ = getattr(self, kind).get(node.name)
                    looked_up.append((kind, node.name, _pass_arg(function_)))
        return function(self, source, *args, **kwargs)

    wrapped._module_runs = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


def _expression_noted(function: Any) -> Any:
    """``Environment.compile_expression`` that tells the compile below it which expression the
    parsed tree it gets is."""
    if getattr(function, "_module_runs", False):
        return function

    def wrapped(self: Any, source: str, *args: Any, **kwargs: Any) -> Any:
        token = _COMPILING.set(("expression", source.encode().decode(), repr((args, kwargs))))
        try:
            return function(self, source, *args, **kwargs)
        finally:
            _COMPILING.reset(token)

    wrapped._module_runs = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


def _load_jinja_plugins() -> None:
    """Load the filter and test plugins of the search path in ansible-playbook itself, where
    each task's worker process inherits them, instead of in every worker again (the loader
    does it on a worker's first template with a filter; a role's plugin directory clears it)."""
    filter_loader._ensure_non_collection_wrappers()
    test_loader._ensure_non_collection_wrappers()


def _warm_exec(function: Any) -> Any:
    """Wrap the local connection's ``exec_command``: a plain pipelined module run is forked
    from the warm interpreter (testkit/warm_modules.py); anything else runs as before."""
    if getattr(function, "_module_runs", False):
        return function

    def wrapped(self: Any, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> Any:
        if in_data is not None:
            ConnectionBase.exec_command(self, cmd, in_data=in_data, sudoable=sudoable)
            result = warm_modules.run(cmd, in_data, self.cwd)
            if result is not None:
                return result
        return function(self, cmd, in_data, sudoable)

    wrapped._module_runs = True  # type: ignore[attr-defined]
    wrapped.__name__ = function.__name__
    return wrapped


def install() -> None:
    """Wrap the two functions that write Python files into a payload and the three methods
    that compile templates (idempotent), and start the module processes without
    PYTHONUNBUFFERED."""
    if not ansible_version.startswith(SUPPORTED):
        raise AnsibleError(
            f"module_runs was written for ansible-core {SUPPORTED}x, not {ansible_version}:"
            " check module_common's payload writing and update or remove this test plugin"
        )
    module_common.recursive_finder = _cached_finder(module_common.recursive_finder)
    module_common._add_module_to_zip = _wrap(module_common._add_module_to_zip)
    AnsibleEnvironment.compile = _cached_compile(AnsibleEnvironment.compile)  # type: ignore[method-assign]
    AnsibleEnvironment._generate = _noting_generate(AnsibleEnvironment._generate)  # type: ignore[method-assign]
    AnsibleEnvironment.compile_expression = _expression_noted(  # type: ignore[method-assign]
        AnsibleEnvironment.compile_expression
    )
    local_connection.Connection.exec_command = _warm_exec(  # type: ignore[method-assign]
        local_connection.Connection.exec_command
    )
    os.environ.pop("PYTHONUNBUFFERED", None)


class CallbackModule(CallbackBase):
    """Installs the wrappers when ansible-playbook loads its callbacks, before any task runs
    (and so before the worker processes fork)."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "module_runs"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install()
        warm_modules.start()

    def v2_playbook_on_stats(self, stats: Any) -> None:
        warm_modules.stop()

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        _load_jinja_plugins()

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        _load_jinja_plugins()
