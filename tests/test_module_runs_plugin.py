"""The test runs' cheaper module runs (testkit/ansible_plugins/callback/module_runs.py): every
Python file of a payload has its pyc beside it, a module gives the same result with it, a host
with another bytecode format compiles the source as before, local module processes start without
PYTHONUNBUFFERED, filter plugins are loaded once in ansible-playbook rather than in each task's
worker, an edited module_utils file reaches the next run while an unchanged set is reused, the
code Jinja generated for a template is reused only while the filters it calls are called the same
way, and the plugin refuses an ansible-core it was not written for. Real ansible-playbook
runs on localhost, no server."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import select
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from testkit.playbook import MODULE_RUNS_ENV, ansible_env, playbook_argv, run_argv
from testkit.warm_modules import parse_command

PLAY = """
- name: One module run, its payload kept
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Stat a path
      ansible.builtin.stat:
        path: {path}
      register: result
    - name: Show the result
      ansible.builtin.debug:
        var: result.stat.isdir
"""


ENV_PLAY = """
- name: What a local module process is given
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Print PYTHONUNBUFFERED as the module's child sees it
      ansible.builtin.shell: echo "unbuffered=[${PYTHONUNBUFFERED-}]"
      changed_when: false
      register: seen
    - name: Show it
      ansible.builtin.debug:
        msg: "{{ seen.stdout }}"
"""


def _playbook(play: Path, env: dict[str, str], args: list[str] | None = None) -> str:
    interpreter = f"ansible_python_interpreter={sys.executable}"
    argv = playbook_argv(play, "localhost,", args=["-c", "local", "-e", interpreter, *(args or [])])
    run = run_argv(argv, env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _kept_payload(tmp_path: Path, *, bytecode: bool) -> tuple[bytes, Path]:
    """Run one ``stat`` with the payload kept on disk; return the payload's zip and its
    AnsiballZ file."""
    remote_tmp = tmp_path / ("kept-bytecode" if bytecode else "kept-source")
    play = tmp_path / "play.yml"
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    play.write_text(PLAY.format(path=target))
    env = ansible_env()
    if not bytecode:
        for key in MODULE_RUNS_ENV:
            env.pop(key)
    env.update(
        ANSIBLE_KEEP_REMOTE_FILES="1",
        ANSIBLE_PIPELINING="0",
        ANSIBLE_REMOTE_TMP=str(remote_tmp),
    )
    _playbook(play, env)
    [ansiballz] = remote_tmp.glob("ansible-tmp-*/AnsiballZ_stat.py")
    found = re.search(r"zip_data='([A-Za-z0-9+/=]+)'", ansiballz.read_text())
    assert found, "no payload in the kept AnsiballZ file"
    return base64.b64decode(found.group(1)), ansiballz


def _names(payload: bytes) -> set[str]:
    return set(zipfile.ZipFile(io.BytesIO(payload)).namelist())


def _run(ansiballz: Path) -> dict[str, object]:
    """Run a kept AnsiballZ file as ansible does (the inventory's interpreter)."""
    out = subprocess.run(
        [sys.executable, str(ansiballz)], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)


def test_every_python_file_of_a_payload_has_its_bytecode(tmp_path: Path) -> None:
    names = _names(_kept_payload(tmp_path, bytecode=True)[0])
    sources = {n for n in names if n.endswith(".py")}
    assert "ansible/module_utils/basic.py" in sources
    assert "ansible/modules/stat.py" in sources
    assert {n + "c" for n in sources} <= names


def test_without_the_plugin_the_payload_is_source_only(tmp_path: Path) -> None:
    names = _names(_kept_payload(tmp_path, bytecode=False)[0])
    assert "ansible/module_utils/basic.py" in names
    assert not [n for n in names if n.endswith(".pyc")]


def test_the_module_answers_the_same_with_bytecode_and_with_source_only(tmp_path: Path) -> None:
    with_bytecode = _run(_kept_payload(tmp_path, bytecode=True)[1])
    source_only = _run(_kept_payload(tmp_path, bytecode=False)[1])
    assert with_bytecode["stat"] == source_only["stat"]  # the same directory, unchanged
    assert with_bytecode["stat"]["isdir"] is True  # type: ignore[index]


def test_a_host_with_another_bytecode_format_compiles_the_source(tmp_path: Path) -> None:
    """A pyc with a foreign magic number is skipped by zipimport: the run still works."""
    payload, ansiballz = _kept_payload(tmp_path, bytecode=True)
    source = zipfile.ZipFile(io.BytesIO(payload))
    foreign = io.BytesIO()
    with zipfile.ZipFile(foreign, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith(".pyc"):
                data = b"\x00\x00\r\n" + data[4:]  # no CPython's magic number
            out.writestr(info, data)
    text = ansiballz.read_text()
    old = base64.b64encode(payload).decode()
    assert old in text
    ansiballz.write_text(text.replace(old, base64.b64encode(foreign.getvalue()).decode()))
    assert _run(ansiballz)["stat"]["isdir"] is True  # type: ignore[index]


def test_local_module_processes_start_without_pythonunbuffered(tmp_path: Path) -> None:
    """ansible-playbook itself keeps it (its output comes as it happens); the processes it
    starts read their code buffered."""
    play = tmp_path / "env.yml"
    play.write_text(ENV_PLAY)
    env = ansible_env() | {"PYTHONUNBUFFERED": "1"}
    assert "unbuffered=[]" in _playbook(play, env)
    without = {k: v for k, v in env.items() if k not in MODULE_RUNS_ENV}
    assert "unbuffered=[1]" in _playbook(play, without)


FILTER_PLUGIN = """import os


def _mark(value):
    return value


with open(os.environ["PIDMARK_FILE"], "a") as out:
    out.write(f"{os.getpid()} {os.getppid()}\\n")


class FilterModule:
    def filters(self):
        return {"pidmark": _mark}
"""
FILTER_PLAY = """
- name: Three tasks using a filter of the playbook's own filter_plugins directory
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Use the filter
      ansible.builtin.debug:
        msg: "{{ 1 | pidmark }}"
    - name: Use it again
      ansible.builtin.debug:
        msg: "{{ 2 | pidmark }}"
    - name: And again
      ansible.builtin.debug:
        msg: "{{ 3 | pidmark }}"
"""


def test_filter_plugins_are_loaded_once_in_ansible_playbook_not_in_every_worker(
    tmp_path: Path,
) -> None:
    """Each task runs in a worker process forked from ansible-playbook; without the plugin
    every worker loads the filter plugins again. With it ansible-playbook loads them before
    the task starts (after the playbook's own plugin directory was added, which clears the
    loader's cache), and the workers inherit them."""
    (tmp_path / "filter_plugins").mkdir()
    (tmp_path / "filter_plugins" / "pidmark.py").write_text(FILTER_PLUGIN)
    play = tmp_path / "filters.yml"
    play.write_text(FILTER_PLAY)
    marks = tmp_path / "marks"
    env = ansible_env() | {"PIDMARK_FILE": str(marks)}

    _playbook(play, {k: v for k, v in env.items() if k not in MODULE_RUNS_ENV})
    loaded = [line.split() for line in marks.read_text().splitlines()]
    assert len(loaded) == 3, loaded  # one import in each task's worker
    assert len({pid for pid, _ in loaded}) == 3

    marks.unlink()
    _playbook(play, env)
    [(_, parent)] = [line.split() for line in marks.read_text().splitlines()]
    assert int(parent) == os.getpid(), "loaded in a worker, not in ansible-playbook"


MODULE = """#!/usr/bin/python
from ansible.module_utils.basic import AnsibleModule
from ansible_collections.kittest.demo.plugins.module_utils.value import VALUE


def main():
    AnsibleModule(argument_spec={}).exit_json(changed=False, value=VALUE)


if __name__ == "__main__":
    main()
"""
ANSWER_PLAY = """
- name: Ask a collection module whose module_utils the test changes
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Ask
      kittest.demo.answer:
      register: answer
    - name: Show it
      ansible.builtin.debug:
        msg: "answer=[{{ answer.value }}]"
"""


def test_a_changed_module_utils_file_is_taken_by_the_next_run(tmp_path: Path) -> None:
    """The module_utils set an earlier run found is reused only while every file of it is
    unchanged: a run after an edit sends the new file, and the run after that reuses it."""
    from testkit.ansible_plugins.callback.module_runs import FINDER_DIR

    collection = tmp_path / "collections" / "ansible_collections" / "kittest" / "demo"
    (collection / "plugins" / "modules").mkdir(parents=True)
    (collection / "plugins" / "module_utils").mkdir()
    (collection / "plugins" / "modules" / "answer.py").write_text(MODULE)
    value = collection / "plugins" / "module_utils" / "value.py"
    value.write_text('VALUE = "one"\n')
    play = tmp_path / "answer.yml"
    play.write_text(ANSWER_PLAY)
    env = ansible_env() | {"ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "collections")}

    def kept() -> list[Path]:
        return [f for f in FINDER_DIR.glob("*.json") if str(value) in f.read_text()]

    assert "answer=[one]" in _playbook(play, env)
    [found] = kept()
    first = found.stat().st_mtime_ns
    value.write_text('VALUE = "two"\n')
    assert "answer=[two]" in _playbook(play, env)
    assert kept() == [found]
    second = found.stat().st_mtime_ns
    assert second != first  # found again: a file of the set changed
    assert "answer=[two]" in _playbook(play, env)
    assert found.stat().st_mtime_ns == second  # reused, not found again


SHOUT_PLAIN = """def shout(value):
    return value.upper() + "!"


class FilterModule:
    def filters(self):
        return {"shout": shout}
"""
SHOUT_WITH_CONTEXT = """from jinja2 import pass_context


@pass_context
def shout(context, value):
    return value.upper() + "?"


class FilterModule:
    def filters(self):
        return {"shout": shout}
"""
SHOUT_PLAY = """
- name: Templates whose generated code the plugin keeps
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Call the playbook's own filter
      ansible.builtin.debug:
        msg: "shouted=[{{ 'hi' | shout }}] {{ '%(mark)s' }}"
    - name: The same text under other delimiters (a template header)
      ansible.builtin.debug:
        msg: "{{ lookup('ansible.builtin.template', '%(header)s') }}"
    - name: The same text under the default ones
      ansible.builtin.debug:
        msg: "{{ lookup('ansible.builtin.template', '%(plain)s') }}"
"""


def test_generated_template_code_is_reused_only_while_what_it_calls_is_the_same(
    tmp_path: Path,
) -> None:
    """The code Jinja generated for a template is kept and reused by the next run; a filter
    that is now called another way (with the context) makes the run generate it again, and a
    template header's other delimiters give other code."""
    from testkit.ansible_plugins.callback.module_runs import TEMPLATE_DIR

    mark = f"mark-{tmp_path.name}-{os.getpid()}"
    (tmp_path / "filter_plugins").mkdir()
    shout = tmp_path / "filter_plugins" / "shout.py"
    shout.write_text(SHOUT_PLAIN)
    body = "{{ 'x' ~ 1 }}[% 'y' ~ 2 %] " + mark + "\n"
    play = tmp_path / "shout.yml"
    files = {"header": tmp_path / "header.j2", "plain": tmp_path / "plain.j2"}
    files["header"].write_text(
        "#jinja2:variable_start_string:'[%', variable_end_string:'%]'\n" + body
    )
    files["plain"].write_text(body)
    play.write_text(SHOUT_PLAY % {"mark": mark, **files})

    def kept() -> dict[Path, int]:
        return {
            f: f.stat().st_mtime_ns
            for f in TEMPLATE_DIR.glob("*.code")
            if mark.encode() in f.read_bytes()
        }

    first = _playbook(play, ansible_env())
    assert "shouted=[HI!]" in first
    assert f"{{{{ 'x' ~ 1 }}}}y2 {mark}" in first  # the header's delimiters
    assert f"x1[% 'y' ~ 2 %] {mark}" in first  # the default ones
    codes = kept()
    assert len(codes) == 3, codes  # the task's template and the two template files

    assert "shouted=[HI!]" in _playbook(play, ansible_env())
    assert kept() == codes  # reused: none generated again

    shout.write_text(SHOUT_WITH_CONTEXT)
    assert "shouted=[HI?]" in _playbook(play, ansible_env())
    again = kept()
    changed = [f for f in codes if again[f] != codes[f]]
    assert len(changed) == 1  # only the template calling the filter was generated again


def test_the_plugin_refuses_an_ansible_core_it_was_not_written_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ansible.errors import AnsibleError

    from testkit.ansible_plugins.callback import module_runs

    monkeypatch.setattr(module_runs, "ansible_version", "2.99.0")
    with pytest.raises(AnsibleError, match=r"written for ansible-core 2\.19"):
        module_runs.install()


# The module process is the shell's parent; a forked one's parent is the handler, and the
# handler's the server (without the plugin: the task's worker, then ansible-playbook).
ANCESTRY = """
        module=$PPID
        handler=$(ps -o ppid= -p "$module" | tr -d ' ')
        server=$(ps -o ppid= -p "$handler" | tr -d ' ')
        echo "server=[$server] $(tr '\\0' ' ' < /proc/$server/cmdline)"
"""
WARM_PLAY = f"""
- name: Local module runs, as a Vault task of the kit runs them
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The module process's environment, working directory and ancestry
      ansible.builtin.shell: |
        env -0 | sort -z | tr '\\0' '\\n'
        echo "cwd=[$(pwd)]"{ANCESTRY}
      changed_when: false
      environment:
        KIT_PLAIN: plain
        KIT_QUOTED: "two words, a 'quote' and $dollar"
      register: first
    - name: A second run
      ansible.builtin.shell: |{ANCESTRY}
      changed_when: false
      register: second
    - name: A module that fails
      ansible.builtin.command: /bin/false
      register: failing
      ignore_errors: true
    - name: Keep them
      ansible.builtin.copy:
        content: "{{{{ {{'first': first.stdout, 'second': second.stdout,
                      'failing': [failing.rc, failing.failed, failing.msg]}} | to_json }}}}"
        dest: "{{{{ seen }}}}"
        mode: "0600"
"""


def _warm_play(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    play = tmp_path / "warm.yml"
    play.write_text(WARM_PLAY)
    seen = tmp_path / "seen.json"
    _playbook(play, env, ["-e", f"seen={seen}"])
    shown: dict[str, Any] = json.loads(seen.read_text())
    return shown


def _environment(stdout: str) -> dict[str, str]:
    """The module's child's environment, without what the shell itself sets."""
    lines = stdout.split("\ncwd=[")[0].splitlines()
    pairs = [line.split("=", 1) for line in lines if re.match(r"^[A-Za-z_]\w*=", line)]
    # PYTHONUNBUFFERED: removed by the plugin (another test)
    shells = {"_", "SHLVL", "PWD", "OLDPWD", "PYTHONUNBUFFERED"}
    return {k: v for k, v in pairs if k not in shells and k not in MODULE_RUNS_ENV}


def _server(stdout: str) -> tuple[str, str]:
    found = re.search(r"server=\[(\d+)\] (.*)", stdout)
    assert found, stdout
    return found.group(1), found.group(2)


def test_local_module_runs_are_forks_of_one_warm_interpreter_that_see_what_a_new_one_sees(
    tmp_path: Path,
) -> None:
    """With the plugin the module processes of two tasks are forks of one server (the parent
    of each module process's parent), which runs testkit.warm_modules in the venv's Python;
    each sees the environment (the task's `environment` too, quoting and all), the working
    directory and the exit status a module process that ansible-core starts sees."""
    env = ansible_env()
    warm = _warm_play(tmp_path, env)
    cold = _warm_play(tmp_path, {k: v for k, v in env.items() if k not in MODULE_RUNS_ENV})

    pid, argv = _server(warm["first"])
    assert "testkit.warm_modules" in argv
    assert _server(warm["second"])[0] == pid
    assert "warm_modules" not in _server(cold["first"])[1]
    assert _server(cold["second"])[0] != pid

    assert _environment(warm["first"]) == _environment(cold["first"])
    assert _environment(warm["first"])["KIT_QUOTED"] == "two words, a 'quote' and $dollar"
    cwd = re.compile(r"cwd=\[(.*)\]")
    assert cwd.findall(warm["first"]) == cwd.findall(cold["first"]) != []
    assert warm["failing"] == cold["failing"]
    assert warm["failing"][:2] == [1, True]
    # The server ends with the ansible-playbook run it served (which stops it and waits for it).
    with contextlib.suppress(ProcessLookupError):
        gone = os.pidfd_open(int(pid))
        try:
            assert select.select([gone], [], [], 60)[0], "the server outlived ansible-playbook"
        finally:
            os.close(gone)


@pytest.mark.parametrize(
    ("cmd", "parsed"),
    [
        ("/bin/sh -c '/v/bin/python3 && sleep 0'", ("/v/bin/python3", {})),
        (
            "/bin/sh -c 'A=1 B='\"'\"'two words'\"'\"' /v/bin/python3 && sleep 0'",
            ("/v/bin/python3", {"A": "1", "B": "two words"}),
        ),
        # Not pipelined: the module is a file on disk.
        ("/bin/sh -c '/v/bin/python3 /tmp/ansible-tmp-1/AnsiballZ_stat.py && sleep 0'", None),
        # Become wraps the command in sudo.
        ("sudo -H -S -n -u root /bin/sh -c 'echo BECOME-SUCCESS-x ; /v/bin/python3'", None),
        ("/bin/sh -c 'python3 && sleep 0'", None),  # no absolute path: not ours
        ("/bin/sh -c '/v/bin/python3 | tee x && sleep 0'", None),
        ("/bin/sh -c 'A=1; /v/bin/python3 && sleep 0'", None),
        # Expansions: the value is the shell's to compute, not a literal.
        ("/bin/sh -c 'A=`id` /v/bin/python3 && sleep 0'", None),
        ("/bin/sh -c 'A=\"$HOME\" /v/bin/python3 && sleep 0'", None),
        (
            "/bin/sh -c 'A='\"'\"'$HOME `id`'\"'\"' /v/bin/python3 && sleep 0'",
            ("/v/bin/python3", {"A": "$HOME `id`"}),
        ),
        ("/bin/sh -c 'unterminated", None),
    ],
)
def test_only_a_plain_pipelined_module_run_is_forked(
    cmd: str, parsed: tuple[str, dict[str, str]] | None
) -> None:
    assert parse_command(cmd) == parsed
