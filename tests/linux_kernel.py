"""Debian packages for the Linux boot tests: fetched with ``apt-get download`` + ``dpkg -x`` into a
cache directory outside the repository, once, and reused by every later session.

Cache: ``$VMMPY_KERNEL_CACHE``, else ``~/.cache/vmmpy-test-kernels``. Each package version gets a
directory ``<package>_<version>/`` holding what the tests use (``boot/`` or ``bin/``), the
``vmlinux`` that :mod:`vmmpy.kernel` extracted from the bzImage, and a ``complete`` marker written
last. A lock file keeps concurrent test runs from fetching the same package twice.

Nothing here skips: if apt cannot resolve or download a package, :class:`FetchError` is raised
and the test that needed it fails with apt's own message.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmmpy import kernel as vmmpy_kernel

#: The kernels the tests boot: flavour → Debian metapackage (which depends on the current ABI's
#: real image package, e.g. linux-image-6.1.0-56-cloud-amd64).
KERNEL_PACKAGES = {"cloud": "linux-image-cloud-amd64", "generic": "linux-image-amd64"}
BUSYBOX_PACKAGE = "busybox-static"


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("VMMPY_KERNEL_CACHE") or os.path.join(Path.home(), ".cache", "vmmpy-test-kernels")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: str | Path | None = None, timeout: float = 600) -> str:
    try:
        p = subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"{' '.join(cmd)}: {e}") from None
    if p.returncode != 0:
        raise FetchError(f"{' '.join(cmd)} exited {p.returncode}: {(p.stderr or p.stdout).strip()[-2000:]}")
    return p.stdout


_updated = False


def _apt_update() -> None:
    """`apt-get update`, at most once per process, and only as root (others cannot)."""
    global _updated
    if _updated or os.geteuid() != 0:
        return
    _run(["apt-get", "update", "-qq"])
    _updated = True


def _candidate(package: str) -> str | None:
    out = _run(["apt-cache", "policy", package])
    m = re.search(r"Candidate:\s*(\S+)", out)
    return None if m is None or m.group(1) == "(none)" else m.group(1)


def resolve(package: str) -> tuple[str, str]:
    """(real package, version): a linux-image metapackage is followed to the image it depends on."""
    for attempt in range(2):
        version = _candidate(package)
        if version is not None:
            break
        if attempt == 0:
            _apt_update()
    else:
        raise FetchError(f"apt knows no candidate for {package} (is the Debian archive reachable?)")
    deps = _run(["apt-cache", "depends", "--important", package])
    for line in deps.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m and package.startswith("linux-image-") and not m.group(1).endswith("-unsigned"):
            real = m.group(1)
            real_version = _candidate(real)
            if real_version is None:
                raise FetchError(f"apt knows no candidate for {real} (needed by {package})")
            return real, real_version
    return package, version


def fetch_package(package: str, keep: tuple[str, ...] = ("boot", "bin", "usr/bin"), tag: str = "") -> Path:
    """Downloads and unpacks `package` (its current candidate) into the cache, once. Returns the
    directory it was unpacked in, holding the `keep` directories (slashes become underscores);
    another `keep` needs another `tag`, its own cache entry."""
    real, version = resolve(package)
    root = cache_dir()
    dest = root / f"{real}_{version.replace(':', '%3a')}{tag}"
    if (dest / "complete").exists():
        return dest
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "complete").exists():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            _run(["apt-get", "download", "-q", f"{real}={version}"], cwd=tmp)
            debs = list(Path(tmp).glob("*.deb"))
            if len(debs) != 1:
                raise FetchError(f"apt-get download {real}={version} left {[d.name for d in debs]}")
            unpacked = Path(tmp) / "root"
            _run(["dpkg", "-x", str(debs[0]), str(unpacked)])
            dest.mkdir()
            for kept in keep:
                if (unpacked / kept).is_dir():
                    shutil.move(str(unpacked / kept), dest / kept.replace("/", "_"))
        for image in (dest / "boot").glob("vmlinuz-*") if (dest / "boot").is_dir() else []:
            vmmpy_kernel.extract_file(image, dest / "vmlinux")
        (dest / "complete").write_text(f"{real} {version}\n")
    return dest


@dataclass
class DebianKernel:
    flavour: str
    package: str
    version: str
    bzimage: Path
    vmlinux: Path
    config: Path

    @property
    def release(self) -> str:
        """The kernel release, e.g. 6.1.0-56-cloud-amd64 (what `Linux version` prints first)."""
        return self.bzimage.name.removeprefix("vmlinuz-")

    def config_value(self, option: str) -> str | None:
        for line in self.config.read_text().splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1]
        return None


def fetch_kernel(flavour: str) -> DebianKernel:
    dest = fetch_package(KERNEL_PACKAGES[flavour])
    (bzimage,) = (dest / "boot").glob("vmlinuz-*")
    (config,) = (dest / "boot").glob("config-*")
    package, version = (dest / "complete").read_text().split()
    return DebianKernel(flavour, package, version, bzimage, dest / "vmlinux", config)


def fetch_kernel_modules(flavour: str) -> Path:
    """The kernel's module tree (lib/modules/<release>/; /usr/lib/modules on merged-/usr
    packages), cached apart from its boot files."""
    dest = fetch_package(KERNEL_PACKAGES[flavour], keep=("lib/modules", "usr/lib/modules"), tag="+modules")
    for tree in (dest / "lib_modules", dest / "usr_lib_modules"):
        if tree.is_dir():
            (release,) = tree.iterdir()
            return release
    raise FetchError(f"{KERNEL_PACKAGES[flavour]} has no lib/modules in {dest}")


def fetch_busybox() -> Path:
    dest = fetch_package(BUSYBOX_PACKAGE)
    for candidate in (dest / "bin" / "busybox", dest / "usr_bin" / "busybox"):
        if candidate.exists():
            return candidate
    raise FetchError(f"{BUSYBOX_PACKAGE} has no busybox binary in {dest}")
