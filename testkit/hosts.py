"""Build the Debian bookworm systemd image that stands in for worker hosts.

``python -m testkit.hosts build`` bootstraps the image with mmdebstrap from Debian packages
(the host's own apt sources, so no mirror is named here), imports it into podman with
``/sbin/init`` as its command, and labels it with a hash of its recipe. When the image already
carries the label of the current recipe the build is skipped.

Podman settings for this kind of machine (runc, ulimits) live in ``testkit/containers.conf``; this
module points ``CONTAINERS_CONF`` at it when the caller has not.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
RECIPE_DIR = KIT_DIR / "host-image"
CONTAINERS_CONF = KIT_DIR / "containers.conf"

IMAGE = "localhost/captcha-kit-host:bookworm"
SUITE = "bookworm"
VARIANT = "apt"
LABEL = "io.captcha-kit.recipe-sha256"
# Bump when the build procedure changes in a way the recipe files do not show.
RECIPE_REVISION = "3"

DEFAULT_SOURCES = (
    Path("/etc/apt/sources.list.d/debian.sources"),
    Path("/etc/apt/sources.list"),
)
DEFAULT_CA_DIR = Path("/usr/local/share/ca-certificates")
HOOK_DIR = Path("/usr/share/mmdebstrap/hooks/merged-usr")
REPO_ROOT = KIT_DIR.parent
# Ansible's user on every host: SSH key only, passwordless sudo (customize.sh), as in production.
SSH_USER = "deploy"
DEFAULT_SSH_KEY = REPO_ROOT / ".state" / "ssh" / "id_ed25519"


class HostImageError(RuntimeError):
    """A build or boot step failed; the message says which and why."""


def podman_env() -> dict[str, str]:
    """The environment for podman calls: the project's containers.conf unless one is set."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, text=True, env=podman_env(), **kwargs)  # type: ignore[call-overload,no-any-return]


def _find_sources() -> Path:
    for candidate in DEFAULT_SOURCES:
        if candidate.is_file() and candidate.read_text().strip():
            return candidate
    raise HostImageError(
        "no apt sources found on this host (looked for "
        + ", ".join(str(p) for p in DEFAULT_SOURCES)
        + "); pass --sources FILE"
    )


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the image; its hash is the image label."""

    sources: Path
    ca_dir: Path
    packages: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def load(cls, sources: Path | None = None, ca_dir: Path | None = None) -> Recipe:
        lines = (RECIPE_DIR / "packages.txt").read_text().splitlines()
        packages = tuple(
            sorted({ln.split("#", 1)[0].strip() for ln in lines} - {""}),
        )
        return cls(
            sources=sources or _find_sources(),
            ca_dir=ca_dir or DEFAULT_CA_DIR,
            packages=packages,
        )

    def ca_certs(self) -> list[Path]:
        if not self.ca_dir.is_dir():
            return []
        return sorted(p for p in self.ca_dir.glob("*.crt") if p.is_file())

    def digest(self) -> str:
        h = hashlib.sha256()
        parts: dict[str, str] = {
            "revision": RECIPE_REVISION,
            "suite": SUITE,
            "variant": VARIANT,
            "packages": ",".join(self.packages),
            "sources": self.sources.read_text(),
            "customize.sh": (RECIPE_DIR / "customize.sh").read_text(),
        }
        for crt in self.ca_certs():
            parts[f"ca/{crt.name}"] = crt.read_text()
        h.update(json.dumps(parts, sort_keys=True).encode())
        return h.hexdigest()


def image_label(image: str = IMAGE) -> str | None:
    """The recipe label of the local image, or None when the image does not exist."""
    res = _run(
        ["podman", "image", "inspect", "--format", "json", image],
        capture_output=True,
    )
    if res.returncode != 0:
        return None
    data = json.loads(res.stdout)
    labels = (data[0].get("Labels") or {}) if data else {}
    value = labels.get(LABEL)
    return str(value) if value else None


def image_id(image: str = IMAGE) -> str | None:
    res = _run(["podman", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True)
    return res.stdout.strip() or None if res.returncode == 0 else None


def build(recipe: Recipe, *, force: bool = False, image: str = IMAGE) -> bool:
    """Build the image unless it is current. Returns True when it was (re)built."""
    digest = recipe.digest()
    if not force and image_label(image) == digest:
        print(f"{image} is up to date (recipe {digest[:12]})")
        return False
    for tool in ("mmdebstrap", "podman"):
        if shutil.which(tool) is None:
            raise HostImageError(f"{tool} not found: run `make host-deps` first")

    previous = image_id(image)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="captcha-kit-image-") as tmp:
        tmpdir = Path(tmp)
        cadir = tmpdir / "ca"
        cadir.mkdir()
        for crt in recipe.ca_certs():
            shutil.copy2(crt, cadir / crt.name)
        rootfs = tmpdir / "rootfs"
        tarball = tmpdir / "rootfs.tar"
        hook = RECIPE_DIR / "customize.sh"
        cmd = [
            "mmdebstrap",
            f"--variant={VARIANT}",
            "--mode=root",
            "--format=directory",
            "--include=" + ",".join(recipe.packages),
            f"--hook-dir={HOOK_DIR}",
            "--customize-hook=" + f'sh {shlex.quote(str(hook))} "$1" {shlex.quote(str(cadir))}',
            "--quiet",
            SUITE,
            str(rootfs),
            str(recipe.sources),
        ]
        print(f"building {image} with mmdebstrap (recipe {digest[:12]}) ...", flush=True)
        res = _run(cmd)
        if res.returncode != 0:
            raise HostImageError(f"mmdebstrap failed with exit status {res.returncode}")
        # mmdebstrap empties /var/lib/apt/lists after the customize hooks, which dates the
        # directory now: date it at the epoch so the apt module's cache_valid_time refreshes.
        os.utime(rootfs / "var/lib/apt/lists", (0, 0))
        res = _run(
            [
                "tar",
                "--create",
                "--file",
                str(tarball),
                "--directory",
                str(rootfs),
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                ".",
            ],
            capture_output=True,
        )
        if res.returncode != 0:
            raise HostImageError(f"tar of the image tree failed: {res.stderr.strip()}")
        res = _run(
            [
                "podman",
                "import",
                "--change",
                'CMD ["/sbin/init"]',
                "--change",
                "STOPSIGNAL SIGRTMIN+3",
                "--change",
                f"LABEL {LABEL}={digest}",
                "--message",
                f"captcha-kit host image, recipe {digest}",
                str(tarball),
                image,
            ],
            capture_output=True,
        )
        if res.returncode != 0:
            raise HostImageError(f"podman import failed: {res.stderr.strip()}")
    if image_label(image) != digest:
        raise HostImageError(f"{image} was imported but does not carry the recipe label")
    if previous and previous != image_id(image):
        # The old image is now untagged; drop it unless a container still uses it.
        _run(["podman", "image", "rm", previous], capture_output=True)
    print(f"built {image} in {time.monotonic() - started:.0f} s")
    return True


def wait_for_systemd(container: str, timeout: float = 120) -> str:
    """Wait until systemd in a running container has finished booting; return "running".

    Early `podman exec` calls can fail before systemd listens on its bus, so they are retried.
    A boot that ends "degraded" (or anything but "running") raises with the failed units.
    """
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        left = max(1, int(deadline - time.monotonic()))
        res = _run(
            [
                "podman",
                "exec",
                container,
                "timeout",
                str(left),
                "systemctl",
                "is-system-running",
                "--wait",
            ],
            capture_output=True,
        )
        state = res.stdout.strip()
        if state == "running":
            return state
        if state in {"degraded", "maintenance", "stopping"}:
            break
        time.sleep(0.2)
    failed = _run(
        ["podman", "exec", container, "systemctl", "--failed", "--no-legend", "--plain"],
        capture_output=True,
    ).stdout.strip()
    raise HostImageError(
        f"systemd in {container} reached {state or 'no answer'!r}; failed units: {failed or '-'}"
    )


def ssh_key(path: Path = DEFAULT_SSH_KEY) -> Path:
    """The controller's private key for the hosts' `deploy` user: ed25519, made once, 0600.
    Stages that start together wait on a lock for the one that makes it."""
    if path.exists():
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "captcha-kit"]
            res = subprocess.run(
                [*keygen, "-f", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                raise HostImageError(f"ssh-keygen failed: {res.stderr.strip()}")
    return path


def _wait_sshd(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise HostImageError(f"sshd did not answer on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.1)


def enable_ssh(container: str, port: int, public_key: str, timeout: float = 30) -> None:
    """Give a booted host its sshd port (127.0.0.1 only) and `deploy`'s authorized key."""
    script = (
        "set -e\n"
        "install -m 0600 -o deploy -g deploy /dev/stdin /home/deploy/.ssh/authorized_keys\n"
        f"printf 'Port %s\\n' {int(port)} >/etc/ssh/captcha-kit/port.conf.new\n"
        "mv /etc/ssh/captcha-kit/port.conf.new /etc/ssh/captcha-kit/port.conf\n"
        "systemctl restart ssh.service\n"
    )
    res = _run(
        ["podman", "exec", "-i", container, "sh", "-c", script],
        input=public_key,
        capture_output=True,
    )
    if res.returncode != 0:
        raise HostImageError(f"sshd in {container} did not start: {res.stderr.strip()}")
    _wait_sshd(port, timeout)


def start_host(
    name: str,
    *,
    ssh_port: int,
    key: Path = DEFAULT_SSH_KEY,
    image: str = IMAGE,
    labels: dict[str, str] | None = None,
    timeout: float = 120,
) -> None:
    """Start a worker host: a systemd container of the image on the host network, booted, with
    sshd on 127.0.0.1:``ssh_port`` for ``deploy`` (key ``key``). A running host is reused."""
    running = _run(
        ["podman", "container", "inspect", "--format", "{{.State.Running}}", name],
        capture_output=True,
    )
    if running.returncode == 0 and running.stdout.strip() != "true":
        _run(["podman", "rm", "--force", "--time", "0", name], capture_output=True)
    if running.returncode != 0 or running.stdout.strip() != "true":
        argv = ["podman", "run", "--detach", "--name", name, "--hostname", name]
        argv += ["--add-host", f"{name}:127.0.0.1"]  # sudo resolves its own host name
        argv += ["--network=host", "--systemd=always", "--cap-add=SYS_ADMIN"]
        for label, value in (labels or {}).items():
            argv += ["--label", f"{label}={value}"]
        res = _run([*argv, image, "/sbin/init"], capture_output=True)
        if res.returncode != 0:
            raise HostImageError(f"podman run {name} failed: {res.stderr.strip()}")
    wait_for_systemd(name, timeout=timeout)
    public_key = Path(f"{ssh_key(key)}.pub").read_text()
    enable_ssh(name, ssh_port, public_key)


def ssh_host_vars(ssh_port: int, key: Path = DEFAULT_SSH_KEY) -> dict[str, object]:
    """Inventory variables that reach a host of ``start_host`` the way production does: SSH as
    the unprivileged ``deploy`` user, ``become`` for root (pipelining and ControlPersist come
    from ansible.cfg). Host keys are made per container, so none is remembered."""
    return {
        "ansible_connection": "ssh",
        "ansible_host": "127.0.0.1",
        "ansible_port": ssh_port,
        "ansible_user": SSH_USER,
        "ansible_become": True,
        "ansible_ssh_private_key_file": str(key),
        "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
        "ansible_python_interpreter": "/usr/bin/python3",
    }


def remove_host(name: str) -> None:
    """Remove a host container (gone already is fine)."""
    _run(["podman", "rm", "--force", "--time", "0", name], capture_output=True)


def smoke(image: str = IMAGE, timeout: int = 120) -> str:
    """Boot a throw-away container (host network, SYS_ADMIN) and wait for systemd.

    Returns the state `systemctl is-system-running --wait` reported ("running").
    """
    name = f"captcha-kit-smoke-{uuid.uuid4().hex[:8]}"
    res = _run(
        [
            "podman",
            "run",
            "--detach",
            "--name",
            name,
            "--network=host",
            "--systemd=always",
            "--cap-add=SYS_ADMIN",
            "--hostname",
            name,
            image,
        ],
        capture_output=True,
    )
    if res.returncode != 0:
        raise HostImageError(f"podman run failed: {res.stderr.strip()}")
    try:
        return wait_for_systemd(name, timeout=timeout)
    finally:
        _run(["podman", "rm", "--force", "--time", "0", name], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.hosts", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the image unless its recipe is unchanged")
    p_build.add_argument("--force", action="store_true", help="rebuild even when current")
    p_build.add_argument("--sources", type=Path, help="apt sources file (default: the host's)")
    p_build.add_argument("--ca-dir", type=Path, help="extra CA certificates (*.crt) to trust")
    p_build.add_argument("--smoke", action="store_true", help="boot a container afterwards")
    sub.add_parser("status", help="say whether the local image matches the recipe")
    sub.add_parser("smoke", help="boot a container with host network and wait for systemd")
    sub.add_parser("hash", help="print the recipe hash")
    p_start = sub.add_parser("start", help="start (or reuse) a host reachable over SSH")
    p_start.add_argument("name")
    p_start.add_argument("--ssh-port", type=int, required=True)
    p_start.add_argument("--key", type=Path, default=DEFAULT_SSH_KEY, help="made if missing")
    p_start.add_argument("--label", action="append", default=[], help="KEY=VALUE container label")
    p_start.add_argument("--timeout", type=float, default=120)
    p_rm = sub.add_parser("rm", help="remove host containers")
    p_rm.add_argument("names", nargs="+")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            build(Recipe.load(args.sources, args.ca_dir), force=args.force)
            if args.smoke:
                print(f"systemd in {IMAGE}: {smoke()}")
        elif args.command == "hash":
            print(Recipe.load().digest())
        elif args.command == "status":
            digest = Recipe.load().digest()
            label = image_label()
            if label == digest:
                print(f"{IMAGE}: up to date ({digest[:12]})")
            else:
                print(f"{IMAGE}: {'missing' if label is None else 'stale'} (recipe {digest[:12]})")
                return 1
        elif args.command == "start":
            labels = dict(item.split("=", 1) for item in args.label)
            start_host(
                args.name, ssh_port=args.ssh_port, key=args.key, labels=labels, timeout=args.timeout
            )
            print(f"{args.name}: {SSH_USER}@127.0.0.1:{args.ssh_port}")
        elif args.command == "rm":
            for name in args.names:
                remove_host(name)
        elif args.command == "smoke":
            print(f"systemd in {IMAGE}: {smoke()}")
    except HostImageError as exc:
        raise SystemExit(f"testkit.hosts: {exc}") from None  # exit status 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
