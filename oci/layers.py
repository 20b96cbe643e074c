"""Unpack image layer tarballs into directories that stack directly as overlayfs lowerdirs.

OCI whiteouts become what overlayfs understands natively: `.wh.<name>` turns into a 0:0
character device called <name>, and `.wh..wh..opq` into the xattr trusted.overlay.opaque=y on
its directory. With that, the unpacked layers of an image can be mounted as
`lowerdir=top:...:bottom` without ever merging them.

Layers come from the network and (later) checkpoint archives, so every member goes through
`safe_path_in`: no absolute paths, no `..`, and no writing through a symlink, even one the same
archive created a moment earlier.
"""
from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from .digest import CHUNK_SIZE, DigestingReader
from .errors import ImageError, UnsafeLayer
from .tree_removal import remove_tree

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# aufs bookkeeping entries (.wh..wh..plnk, .wh..wh.aufs) carry no meaning for overlay.
_AUFS_META_PREFIX = ".wh..wh."
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XATTR_PREFIX = "trusted.overlay."
_PAX_XATTR_PREFIX = "SCHILY.xattr."

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

LAYER_MEDIA_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})


# ---------------------------------------------------------------- safe paths (reusable)

def clean_member_path(name: str, context: str = "") -> PurePosixPath:
    """Lexically validate an archive member name and return it relative ("." for the root).

    Refuses absolute names and any `..` component instead of normalising them away: a
    layer that tries either is malformed or hostile, and silently fixing it hides that.
    """
    if not name or "\0" in name:
        raise UnsafeLayer(name, "empty name or NUL byte", context)
    if name.startswith("/"):
        raise UnsafeLayer(name, "absolute path", context)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(name, "'..' component escapes the destination", context)
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def safe_path_in(root: Path, name: str, *, create_parents: bool = False,
                 context: str = "") -> Path:
    """Path of archive member `name` under `root`, guaranteed not to leave `root`.

    Every ancestor between root and the member must be a real directory (not a symlink),
    so nothing written there can be redirected elsewhere. The final component itself is
    not checked: callers replace it (unlink, never follow). Missing ancestors are created
    (mode 0755) when `create_parents` is set.
    """
    rel = clean_member_path(name, context)
    current = root
    for part in rel.parts[:-1]:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not create_parents:
                raise UnsafeLayer(name, f"parent directory {part!r} does not exist", context)
            os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeLayer(name, f"parent {part!r} is a symlink; refusing to write through it",
                              context)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(name, f"parent {part!r} is not a directory", context)
    return root / rel if rel.parts else root


def remove_path(path: Path) -> None:
    """Remove whatever is at `path` (file, symlink, device, directory tree) without following links."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)


# ---------------------------------------------------------------- decompression

def check_layer_media_type(media_type: str, context: str = "") -> None:
    if media_type not in LAYER_MEDIA_TYPES:
        raise ImageError(f"unsupported layer media type {media_type!r}" +
                         (f" for {context}" if context else ""))


@contextmanager
def open_decompressed(path: Path) -> Iterator[BinaryIO]:
    """The uncompressed tar stream of a layer blob, detected by magic bytes.

    Sniffing rather than trusting the media type alone: registries and tools mislabel
    compression often enough (e.g. "tar" layers that are gzipped), and the magic is exact.
    """
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        elif magic == ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImageError(f"layer {path} is zstd-compressed but the zstandard module "
                                 "is not installed") from exc
            with zstandard.ZstdDecompressor().stream_reader(raw) as zs:
                yield zs
        else:
            yield raw


# ---------------------------------------------------------------- extraction

@dataclass
class _Extraction:
    dest: Path
    context: str
    # Directory mtimes are applied last: creating entries inside a directory bumps its mtime.
    dir_times: list[tuple[Path, float, float]] = field(default_factory=list)


def unpack_layer(blob_path: Path, media_type: str, dest: Path) -> str:
    """Unpack a layer blob into `dest` (created if missing); returns the diff_id (digest of the tar).

    The caller compares the returned diff_id with the image config's rootfs.diff_ids.
    """
    context = str(blob_path)
    check_layer_media_type(media_type, context)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with open_decompressed(blob_path) as stream:
            reader = DigestingReader(stream)
            extract_tar_stream(reader, dest, context)
            reader.drain()
    except corrupt_stream_errors() as exc:
        raise ImageError(f"layer {blob_path} is not a readable (compressed) tar archive: {exc}") from exc
    return reader.digest


def corrupt_stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this (compressed) tar stream is damaged", as opposed to our bugs."""
    errors: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, gzip.BadGzipFile,
                                               zlib.error)
    try:
        import zstandard
        errors += (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return errors


def extract_tar_stream(fileobj: BinaryIO, dest: Path, context: str = "") -> None:
    """Extract an uncompressed tar stream into `dest`, converting OCI whiteouts for overlayfs."""
    state = _Extraction(dest, context)
    with tarfile.open(fileobj=fileobj, mode="r|", errors="surrogateescape") as tar:
        for member in tar:
            _extract_member(tar, member, state)
    for path, atime, mtime in reversed(state.dir_times):
        os.utime(path, (atime, mtime), follow_symlinks=False)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, state: _Extraction) -> None:
    rel = clean_member_path(member.name, state.context)
    if not rel.parts:
        _extract_root(member, state)
        return
    target = safe_path_in(state.dest, member.name, create_parents=True, context=state.context)
    base = rel.name
    if base == OPAQUE_MARKER:
        os.setxattr(target.parent, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
        return
    if base.startswith(_AUFS_META_PREFIX):
        return
    if base.startswith(WHITEOUT_PREFIX):
        _make_whiteout(target.parent, base[len(WHITEOUT_PREFIX):], member.name, state.context)
        return
    _write_entry(tar, member, target, state)


def _extract_root(member: tarfile.TarInfo, state: _Extraction) -> None:
    if not member.isdir():
        raise UnsafeLayer(member.name, "archive root entry is not a directory", state.context)
    _apply_metadata(state.dest, member)
    state.dir_times.append((state.dest, _atime(member), member.mtime))


def _make_whiteout(parent: Path, victim: str, member_name: str, context: str) -> None:
    if victim in ("", ".", "..") or "/" in victim:
        raise UnsafeLayer(member_name, f"whiteout names {victim!r}, not a sibling entry", context)
    target = parent / victim
    remove_path(target)
    # overlayfs spells "deleted in this layer" as a character device with device number 0:0.
    os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def _write_entry(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path,
                 state: _Extraction) -> None:
    existing_is_dir = _is_real_dir(target)
    if not (member.isdir() and existing_is_dir):
        remove_path(target)

    if member.isdir():
        if not existing_is_dir:
            os.mkdir(target, 0o700)
    elif member.isreg():
        _write_regular_file(tar, member, target)
    elif member.issym():
        os.symlink(member.linkname, target)
    elif member.islnk():
        _make_hardlink(member, target, state)
        return  # the link shares its inode (and metadata) with the file it points to
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(target, 0o600)
    else:
        raise ImageError(f"unsupported tar member type {member.type!r} for {member.name!r} "
                         f"in {state.context}")

    _apply_metadata(target, member)
    if member.isdir():
        state.dir_times.append((target, _atime(member), member.mtime))
    else:
        os.utime(target, (_atime(member), member.mtime), follow_symlinks=False)


def _write_regular_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    src = tar.extractfile(member)
    # O_EXCL|O_NOFOLLOW: the old entry was removed above; anything there now is an attack.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        if src is not None:
            shutil.copyfileobj(src, out, CHUNK_SIZE)


def _make_hardlink(member: tarfile.TarInfo, target: Path, state: _Extraction) -> None:
    source = safe_path_in(state.dest, member.linkname, context=state.context)
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise UnsafeLayer(member.name, f"hard link target {member.linkname!r} is not in this layer",
                          state.context) from None
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeLayer(member.name, f"hard link to directory {member.linkname!r}", state.context)
    os.link(source, target, follow_symlinks=False)


def _apply_metadata(path: Path, member: tarfile.TarInfo) -> None:
    # Order matters: chown clears setuid/setgid bits and security.capability, so it goes first.
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    for name, value in _xattrs(member):
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            # Filesystems without e.g. security.selinux support: the rest of the image still works.
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise


def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    for key, value in member.pax_headers.items():
        if not key.startswith(_PAX_XATTR_PREFIX):
            continue
        name = key[len(_PAX_XATTR_PREFIX):]
        # A layer must not carry overlay's own metadata: only markers decide opaqueness.
        if name.startswith(_OVERLAY_XATTR_PREFIX):
            continue
        yield name, value.encode("utf-8", "surrogateescape")


def _atime(member: tarfile.TarInfo) -> float:
    try:
        return float(member.pax_headers.get("atime", member.mtime))
    except ValueError:
        return member.mtime


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
