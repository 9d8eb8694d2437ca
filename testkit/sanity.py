"""ansible-test sanity for the captcha_kit.vault collection: its home (the per-test virtual
environments it caches) and the stand-in for its pip bootstrap.

    python -m testkit.sanity prime    # build the sanity tests' virtual environments, run none

ansible-test runs each sanity test that has requirements in a virtual environment of its own,
cached under ``$HOME/.ansible/test/venv`` (here ``.state/test/ansible-test-home``), and starts
each new one with pip from a ``get-pip.py`` it downloads from a host this machine does not
reach. The stand-in put in its cache instead installs the pip version asked with the kit's own
pip (``pip --python``): no download, and no ``ensurepip`` run first (1.9 instead of 6 CPU-s per
environment). ``make test`` primes the environments in a lane of their own, beside the others,
and the stage that runs the sanity tests (tests/test_collection_build.py) waits for it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from testkit.paths import BIN, COLLECTION, STATE

SANITY_HOME = STATE / "test" / "ansible-test-home"
PYTHON = "3.11"
# ansible-test primes every sanity test's environment; this one is for a test that finds
# nothing to check in the collection (it has no changelogs/ fragments) and builds none.
NOT_PRIMED = ["changelog"]

GET_PIP = '''"""Stand-in for get-pip.py (ansible-test's pip bootstrap of a new, empty venv): the
kit's own pip installs the pins asked into this interpreter's environment (testkit/sanity.py)."""
import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
pip = [{python!r}, "-m", "pip", "--python", sys.executable, "install", "--quiet"]
sys.exit(subprocess.call([*pip, *args]))
'''


def home() -> Path:
    """ansible-test's home: its venv cache, and the pip bootstrap stand-in for its version."""
    import ansible_test

    source = Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
    match = re.search(r"pip='([0-9.]+)'", source.read_text())
    if not match:
        raise RuntimeError("ansible-test's pip version moved: update the stand-in's file name")
    cache = SANITY_HOME / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    stand_in = cache / f"get_pip_{match.group(1).replace('.', '_')}.py"
    text = GET_PIP.format(python=str(BIN / "python"))
    if not stand_in.exists() or stand_in.read_text() != text:
        stand_in.write_text(text)
    return SANITY_HOME


def env() -> dict[str, str]:
    """ansible-test's environment: no Vault settings, its own home, the venv's tools first."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    return clean | {"HOME": str(home()), "PATH": f"{BIN}{os.pathsep}{clean.get('PATH', '')}"}


def command(*args: str) -> list[str]:
    return [str(BIN / "ansible-test"), "sanity", "--local", "--python", PYTHON, *args]


def prime() -> int:
    """Build the environments of the sanity tests, on a copy of the collection (ansible-test
    writes under the collection's tests/output)."""
    skip = [arg for name in NOT_PRIMED for arg in ("--skip-test", name)]
    with tempfile.TemporaryDirectory(prefix="captcha-kit-sanity-") as tmp:
        root = Path(tmp) / "ansible_collections" / "captcha_kit" / "vault"
        shutil.copytree(COLLECTION, root, ignore=shutil.ignore_patterns("output", "__pycache__"))
        return subprocess.run(command("--prime-venvs", *skip), cwd=root, env=env()).returncode


def main(argv: list[str]) -> int:
    if argv != ["prime"]:
        usage = next(line for line in __doc__.splitlines() if "python -m testkit.sanity" in line)
        print(f"usage: {usage.strip()}", file=sys.stderr)
        return 2
    return prime()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
