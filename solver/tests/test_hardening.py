import subprocess
import sys


def test_harden_process_turns_off_core_files_and_dumping():
    """In a fresh interpreter (the test process itself stays as it is): dumpable before, then
    neither a core file nor a dump after, and nothing reported missing."""
    script = (
        "import resource\n"
        "from captcha_solver.hardening import harden_process, is_dumpable\n"
        "before = is_dumpable()\n"
        "missing = harden_process()\n"
        "print(before, is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE), missing)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "True False (0, 0) []"
