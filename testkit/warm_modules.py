"""Local module runs forked from a warm interpreter: a test-run measure of the ``module_runs``
callback plugin (testkit/ansible_plugins/callback/module_runs.py).

A module that ansible-playbook runs on the controller (every Vault module of the kit: it talks
to Vault from the controller) starts a new Python process, which imports
``ansible.module_utils.basic`` and, for the kit's Vault modules, hvac and requests before the
module's own code runs: about 0.23 of the 0.3 CPU-seconds such a run costs, in each of the
~1,600 local module runs of ``make test``. Here each ansible-playbook run starts a server in
its own (the venv's) Python, which imports those on the first request; each local module run is
then a fork of it that runs the very payload ansible-playbook built (the AnsiballZ wrapper, with
its zip of the module and module_utils) as ``__main__``, in the task's working directory with
the task's environment, stdin from /dev/null (the wrapper, which a pipelined run reads from
stdin, is its code), stdout and stderr back to the task's worker, and its exit status as the
return code. The module, its module_utils and hvac are the installed ones (ansible-playbook
builds the payload's copies from the same installation), and they talk to the same servers.

Only a plain pipelined run of the venv's own Python is forked: ``<shell> -c '[NAME=value ...]
<python> && sleep 0'``, checked token by token; a run with become, with a module file on disk,
of another interpreter or with an environment the shell would expand runs as ansible-core runs
it, and so does every run when the server is not there.
The server listens on a Unix socket in a directory only this user can enter
(``.state/test/warm/<ansible-playbook pid>.sock``); ansible-playbook stops it and waits for it
when it ends (so the module processes' CPU time counts as ansible-playbook's), and a server
whose ansible-playbook was killed sees its stop pipe close and ends too.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import json
import multiprocessing
import os
import re
import selectors
import shlex
import socket
import struct
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

STATE = Path(__file__).resolve().parents[1] / ".state" / "test" / "warm"
# What a module process of the kit imports before the module's own code: ansible's module
# side, and hvac (with requests and urllib3) for the Vault modules.
PRELOAD = (
    "ansible.module_utils.basic",
    "ansible.module_utils._internal._ansiballz._loader",
    "hvac",
)
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_HEADER = struct.Struct("!II")  # the request's JSON header and code lengths
_REPLY = struct.Struct("!iII")  # return code, stdout and stderr lengths
_SUN_PATH_MAX = 107


def parse_command(cmd: str) -> tuple[str, dict[str, str]] | None:
    """The interpreter and environment assignments of a plain pipelined module run, or None
    when ``cmd`` is anything else (become, a temporary file, a pipeline)."""
    try:
        outer = shlex.split(cmd)
    except ValueError:
        return None
    if len(outer) != 3 or outer[1] != "-c":
        return None
    if _expands(outer[2]):
        return None
    # Shell operators are tokens of their own ("A=1;" is not an assignment to the command).
    lexer = shlex.shlex(outer[2], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        inner = list(lexer)
    except ValueError:
        return None
    if len(inner) < 4 or inner[-3:] != ["&&", "sleep", "0"]:
        return None
    *assignments, interpreter = inner[:-3]
    if not interpreter.startswith("/") or not all(_ASSIGNMENT.match(w) for w in assignments):
        return None
    return interpreter, dict(word.split("=", 1) for word in assignments)


def _expands(text: str) -> bool:
    """Whether the shell would expand something in ``text`` (a ``$`` or a backquote outside
    single quotes); ansible-core quotes each value of a task's environment (shlex.quote)."""
    quote = ""
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quote == "'":
            quote = "" if char == "'" else quote
        elif char in "$`":
            return True
        elif char == "\\":
            escaped = True
        elif char in "'\"":
            quote = "" if quote == char else (quote or char)
    return False


def _our_python(python: str) -> bool:
    """Whether ``python`` is this venv's interpreter, the one the server runs."""
    ours = sys.executable
    try:
        return os.path.dirname(python) == os.path.dirname(ours) and os.path.samefile(python, ours)
    except OSError:
        return False


def _send_all(conn: socket.socket, *chunks: bytes) -> None:
    conn.sendall(b"".join(chunks))


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return bytes(data)


# ------------------------------------------------------------------------ ansible-playbook's side


@dataclass
class _Server:
    process: subprocess.Popen[bytes]
    path: Path
    stop: int  # the write end of the server's stop pipe


_SERVER: _Server | None = None


def start() -> None:
    """Start the server of this ansible-playbook process (its callback plugin calls this
    before any task, so that every task worker inherits where it listens). The server imports
    the module side on its first request: a run without local modules pays only its start."""
    global _SERVER
    if _SERVER is not None:
        return
    path = STATE / f"{os.getpid()}.sock"
    if len(str(path)) > _SUN_PATH_MAX:
        return  # too deep a checkout for a Unix socket: modules run as ansible-core runs them
    STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    STATE.chmod(0o700)
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    boot = f"import testkit.warm_modules as w; w.serve({str(path)!r}, {ready_w}, {stop_r})"
    with open(path.with_suffix(".log"), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", boot],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(ready_w, stop_r),
            # A session of its own, as each task worker has: a signal to ansible-playbook's
            # process group (Ctrl-C, a test's SIGKILL) does not reach a module in flight.
            start_new_session=True,
        )
    os.close(ready_w)
    os.close(stop_r)
    with os.fdopen(ready_r, "rb") as ready:
        up = ready.read(1) == b"1"
    if not up:
        process.wait()
        os.close(stop_w)
        return
    _SERVER = _Server(process, path, stop_w)
    atexit.register(stop)


def stop() -> None:
    """Stop the server and wait for it (its module processes' CPU time then counts as
    ansible-playbook's, as a module process's does without it)."""
    global _SERVER
    if _SERVER is None or multiprocessing.parent_process() is not None:
        return
    server, _SERVER = _SERVER, None
    with contextlib.suppress(OSError):
        os.write(server.stop, b"stop")
    os.close(server.stop)
    server.process.wait()


# ------------------------------------------------------------------------ a task worker's side


def run(cmd: str, in_data: bytes, cwd: str | bytes | None) -> tuple[int, bytes, bytes] | None:
    """Run the pipelined module ``cmd`` would run, forked from the warm server: the return code,
    stdout and stderr; None when this run is not one the server takes (run it as usual)."""
    parsed = parse_command(cmd)
    if parsed is None or _SERVER is None or not _our_python(parsed[0]):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(_SERVER.path))
    except OSError:
        conn.close()
        return None
    # The local connection runs a module in the playbook's directory (bytes).
    where = os.fsdecode(cwd) if cwd else os.getcwd()
    header = json.dumps({"cwd": where, "env": {**os.environ, **parsed[1]}}).encode()
    with conn:
        _send_all(conn, _HEADER.pack(len(header), len(in_data)), header, in_data)
        rc, out_len, err_len = _REPLY.unpack(_recv_exact(conn, _REPLY.size))
        return rc, _recv_exact(conn, out_len), _recv_exact(conn, err_len)


# --------------------------------------------------------------------------- the server


def serve(path: str, ready_fd: int, stop_fd: int) -> None:
    """Listen on ``path`` and fork a handler per request (which forks the module process)
    until ansible-playbook writes to ``stop_fd`` or ends; then wait for the handlers."""
    sys_path = list(sys.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(stop_fd, selectors.EVENT_READ)
    handlers: set[int] = set()
    preloaded = False
    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj == stop_fd:
                _remove(path)
                for pid in handlers:  # in flight: their module processes finish
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)
                os._exit(0)
            conn, _ = listener.accept()
            if not preloaded:
                for name in PRELOAD:
                    __import__(name)
                preloaded = True
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                os.close(stop_fd)
                _handle(conn, sys_path)
            conn.close()
            handlers.add(pid)
        # Reap the handlers that ended: their CPU time, and their module processes', adds to
        # this process's, which ansible-playbook collects when it waits for it.
        for pid in list(handlers):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    handlers.discard(pid)


def _remove(path: str) -> None:
    """Remove the server's socket, and its log unless something was logged."""
    sock = Path(path)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log = sock.with_suffix(".log")
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size == 0:
            log.unlink()


def _handle(conn: socket.socket, sys_path: list[str]) -> None:
    """In a fork of the server: run the request's module in a fork of this process, send back
    its return code, stdout and stderr, and end."""
    status = 1
    try:
        header_len, code_len = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
        request = json.loads(_recv_exact(conn, header_len))
        code = _recv_exact(conn, code_len)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            conn.close()
            os.close(out_r)
            os.close(err_r)
            _module_process(code, request, sys_path, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        out, err = _read_both(out_r, err_r)
        _, wait_status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(wait_status)
        if rc < 0:  # killed by a signal: what `sh -c 'python3 && sleep 0'` returns then
            rc = 128 - rc
        _send_all(conn, _REPLY.pack(rc, len(out), len(err)), out, err)
        status = 0
    except Exception:
        traceback.print_exc()
    finally:
        os._exit(status)


def _read_both(out_fd: int, err_fd: int) -> tuple[bytes, bytes]:
    chunks: dict[int, bytearray] = {out_fd: bytearray(), err_fd: bytearray()}
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                fd = key.fd
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd] += data
                else:
                    selector.unregister(fd)
                    os.close(fd)
    return bytes(chunks[out_fd]), bytes(chunks[err_fd])


def _module_process(
    code: bytes, request: dict[str, object], sys_path: list[str], out_fd: int, err_fd: int
) -> None:
    """Be the module process ``python3`` reading ``code`` from stdin would be, then exit."""
    status = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (null, out_fd, err_fd):
            os.close(fd)
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(str(request["cwd"]))
        sys.path[:] = sys_path
        sys.argv[:] = [""]
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        try:
            exec(compile(code, "<stdin>", "exec"), main.__dict__)  # noqa: S102 - the module
            status = 0
        except SystemExit as exit_:
            status = _exit_status(exit_.code)
        except BaseException:
            traceback.print_exc()
            status = 1
        if "threading" in sys.modules:  # as Python's own exit: wait for non-daemon threads
            sys.modules["threading"]._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _exit_status(code: object) -> int:
    """The exit status Python gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
