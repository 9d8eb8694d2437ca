"""Build the Debian bookworm systemd image that stands in for worker hosts.

``python -m tools.host_image build`` bootstraps the image with mmdebstrap from Debian packages
(the host's own apt sources, so no mirror is named here), imports it into podman with
``/sbin/init`` as its command, and labels it with a hash of its recipe. When the image already
carries the label of the current recipe the build is skipped.

Podman settings for this kind of machine (runc, ulimits) live in ``tools/containers.conf``; this
module points ``CONTAINERS_CONF`` at it when the caller has not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
RECIPE_DIR = TOOLS_DIR / "host-image"
CONTAINERS_CONF = TOOLS_DIR / "containers.conf"

IMAGE = "localhost/captcha-kit-host:bookworm"
SUITE = "bookworm"
VARIANT = "apt"
LABEL = "io.captcha-kit.recipe-sha256"
# Bump when the build procedure changes in a way the recipe files do not show.
RECIPE_REVISION = "2"

DEFAULT_SOURCES = (
    Path("/etc/apt/sources.list.d/debian.sources"),
    Path("/etc/apt/sources.list"),
)
DEFAULT_CA_DIR = Path("/usr/local/share/ca-certificates")
HOOK_DIR = Path("/usr/share/mmdebstrap/hooks/merged-usr")


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
    parser = argparse.ArgumentParser(prog="python -m tools.host_image", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build the image unless its recipe is unchanged")
    p_build.add_argument("--force", action="store_true", help="rebuild even when current")
    p_build.add_argument("--sources", type=Path, help="apt sources file (default: the host's)")
    p_build.add_argument("--ca-dir", type=Path, help="extra CA certificates (*.crt) to trust")
    p_build.add_argument("--smoke", action="store_true", help="boot a container afterwards")
    sub.add_parser("status", help="say whether the local image matches the recipe")
    sub.add_parser("smoke", help="boot a container with host network and wait for systemd")
    sub.add_parser("hash", help="print the recipe hash")
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
        elif args.command == "smoke":
            print(f"systemd in {IMAGE}: {smoke()}")
    except HostImageError as exc:
        print(f"host_image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
