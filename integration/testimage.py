"""A small, real, runnable test image built from the host's static busybox; no network needed.

Two layers on purpose (busybox + applet symlinks gzip-compressed, /etc and /tmp as a plain
tar), so pulls exercise layer stacking and both compression paths. Timestamps are fixed, so
the same busybox binary always yields the same digests.
"""
from __future__ import annotations

import gzip
import io
import platform
import subprocess
import tarfile
import tempfile
from pathlib import Path

from oci.layout import import_oci_archive, write_oci_layout
from oci.registry import Credentials, RegistryClient
from oci.store import ImageStore

BUSYBOX = Path("/bin/busybox")
FIXED_MTIME = 1_700_000_000  # any constant: reproducible digests
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\nnobody:x:65534:\n"
# What a container needs even if `busybox --list-full` were unavailable.
ESSENTIAL_APPLETS = ["bin/sh", "bin/sleep", "bin/cat", "bin/echo", "bin/ls", "bin/ps", "usr/bin/top",
                     "usr/bin/env", "usr/bin/id", "bin/hostname", "usr/bin/wc", "bin/mkdir", "bin/rm",
                     "bin/touch", "bin/true", "bin/false", "usr/bin/nc", "usr/bin/wget", "bin/date",
                     "bin/dd", "usr/bin/head", "usr/bin/tail", "bin/grep", "bin/sed", "bin/kill",
                     "bin/mount", "bin/stat"]
# Host programs busybox lacks, copied in with the libraries they load: util-linux flock holds file
# locks for the restore tests (busybox has no flock applet).
HOST_PROGRAMS = {"usr/bin/flock": Path("/usr/bin/flock")}
# Test tools built from integration/tools/*.c with `gcc -static -O2` (no libraries to copy):
# locker holds and probes flock, POSIX and OFD locks (the file-lock restore tests).
TOOLS_DIR = Path(__file__).resolve().parent / "tools"
BUILT_TOOLS = {"usr/bin/locker": TOOLS_DIR / "locker.c"}
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def busybox_applet_paths(busybox: Path = BUSYBOX) -> list[str]:
    """Applet install paths (e.g. "bin/sh", "usr/bin/wget") as this busybox lays them out."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True,
                             text=True).stdout
        paths = {p.strip().lstrip("/") for p in out.splitlines() if p.strip()}
    except (OSError, subprocess.CalledProcessError):
        paths = set()
    paths |= set(ESSENTIAL_APPLETS)
    paths.discard("bin/busybox")
    return sorted(paths)


def _dir(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, FIXED_MTIME
    return info


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, FIXED_MTIME
    return info, io.BytesIO(data)


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, FIXED_MTIME
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o755, FIXED_MTIME
    return info


def _write_busybox_layer(path: Path, hardlinks: bool = False, busybox: Path = BUSYBOX) -> None:
    applets = busybox_applet_paths(busybox)
    dirs = sorted({str(Path(p).parent) for p in applets} | {"bin"})
    # gzip mtime=0 so the compressed blob (and so the manifest) is reproducible too.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            tar.addfile(_dir(d))
        tar.addfile(*_file("bin/busybox", busybox.read_bytes(), 0o755))
        for applet in applets:
            tar.addfile(_hardlink(applet, "bin/busybox") if hardlinks else _symlink(applet, "/bin/busybox"))


def _shared_libraries(program: Path) -> list[Path]:
    """The libraries (and loader) `program` needs, as ldd resolves them on this host."""
    out = subprocess.run(["ldd", str(program)], check=True, capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def _host_program_files() -> dict[str, tuple[bytes, int]]:
    return host_program_files(HOST_PROGRAMS)


def host_program_files(programs: dict[str, Path]) -> dict[str, tuple[bytes, int]]:
    """Host programs (image path -> host path) with the libraries they load; missing ones are left out."""
    files: dict[str, tuple[bytes, int]] = {}
    for name, program in programs.items():
        if not program.is_file():
            continue
        files[name] = (program.read_bytes(), 0o755)
        for lib in _shared_libraries(program):
            files[str(lib).lstrip("/")] = (lib.resolve().read_bytes(), 0o755)
    return files


def _built_tool_files() -> dict[str, tuple[bytes, int]]:
    return build_static_tools(BUILT_TOOLS)


def build_static_tools(tools: dict[str, Path]) -> dict[str, tuple[bytes, int]]:
    """Compile each C source with `gcc -static`: image path -> (program bytes, mode 0755)."""
    files: dict[str, tuple[bytes, int]] = {}
    with tempfile.TemporaryDirectory(prefix="pyshim-tools-") as tmp:
        for name, source in tools.items():
            out = Path(tmp) / Path(name).name
            try:
                subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(source)], check=True,
                               capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError("gcc is missing: run `make deps` (scripts/install-system-deps.sh)") from None
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"building {source} failed (gcc + libc6-dev from `make deps`?):\n"
                                   f"{exc.stderr}") from None
            files[name] = (out.read_bytes(), 0o755)
    return files


def _write_base_files_layer(path: Path) -> None:
    programs = {**_host_program_files(), **_built_tool_files()}
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode in [("etc", 0o755), ("tmp", 0o1777), ("root", 0o700), ("home", 0o755),
                        ("var", 0o755), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755)]:
            tar.addfile(_dir(d, mode))
        tar.addfile(*_file("etc/passwd", PASSWD.encode()))
        tar.addfile(*_file("etc/group", GROUP.encode()))
        for d in sorted({str(p) for name in programs for p in Path(name).parents if str(p) != "."}):
            tar.addfile(_dir(d))
        for name, (data, mode) in sorted(programs.items()):
            tar.addfile(*_file(name, data, mode))


def busybox_config(labels: dict | None = None) -> dict:
    return {
        "architecture": _GOARCH.get(platform.machine(), "amd64"),
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["sh"], "Env": [PATH_ENV], **({"Labels": labels} if labels else {})},
        "history": [{"created_by": "pyshim testimage: busybox and applet symlinks"},
                    {"created_by": "pyshim testimage: /etc/passwd, /etc/group, /tmp"}],
    }


def write_busybox_layers(dest_dir: Path, hardlinks: bool = False, busybox: Path = BUSYBOX) -> list[Path]:
    """The busybox image's layers (bottom -> top) as files in dest_dir, for images built on it.

    `hardlinks`: applets as hard links to /bin/busybox, as the official busybox images have them,
    instead of symlinks (a path masked with /dev/null then masks that applet only). `busybox`: another
    busybox binary than the host's static one (its libraries are the caller's business)."""
    if not busybox.is_file():
        raise RuntimeError(f"{busybox} is missing (Debian package busybox-static)")
    busybox_layer, base_layer = Path(dest_dir) / "busybox.tar.gz", Path(dest_dir) / "base.tar"
    _write_busybox_layer(busybox_layer, hardlinks, busybox)
    _write_base_files_layer(base_layer)
    return [busybox_layer, base_layer]


def build_busybox_layout(dest_dir: Path, ref_name: str = "busybox:latest", labels: dict | None = None) -> Path:
    """Write an OCI image layout for the busybox test image into dest_dir; returns dest_dir.
    `labels` make an image of the same files with another digest."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyshim-busybox-layers-") as tmp:
        write_oci_layout(dest_dir, write_busybox_layers(Path(tmp)), busybox_config(labels), ref_name)
    return dest_dir


def push_busybox(registry_address: str, repo: str = "busybox", tag: str = "latest",
                 auth: Credentials | None = None, labels: dict | None = None) -> str:
    """Build the busybox image and push it to registry_address/repo:tag; returns that reference.

    The registry is a test registry: plain HTTP is allowed even when it is not on loopback."""
    ref = f"{registry_address}/{repo}:{tag}"
    with tempfile.TemporaryDirectory(prefix="pyshim-busybox-push-") as tmp:
        layout = build_busybox_layout(Path(tmp) / "layout", ref, labels)
        store = ImageStore(Path(tmp) / "store")
        [image] = import_oci_archive(store, layout)
        RegistryClient(insecure_registries=(registry_address,)).push(store, image, ref, auth=auth)
    return ref
