"""The container's writable-layer changes: written from the overlayfs upper directory at
checkpoint (rootfs-diff.tar + deleted.files), applied to the new container's root filesystem
at restore.

Writing. Everything in the upper directory is new or changed (overlayfs copies a file up before
changing it), so the upper directory *is* the diff, except for overlayfs' own bookkeeping:
- a whiteout (character device 0:0, or a zero-size file with trusted.overlay.whiteout) is a
  deleted path: it goes into deleted.files, never into the tar;
- an opaque directory (trusted.overlay.opaque=y) is a directory whose lower contents were all
  deleted (`rm -rf d; mkdir d`). It is written as the directory and its new contents in the
  tar, plus deletions in deleted.files: given the lower directories, exactly the lower entries
  it hides (so the archive means the same whatever order a consumer applies the two in);
  without them, the directory itself. CRI-O and Podman apply the tar *before* deleting, so that
  second form is only right for consumers that delete first, as apply_rootfs_diff does;
- trusted.overlay.* xattrs are never copied; redirect and metacopy upper entries (which hold
  no data of their own) are refused: pyshim mounts overlays without them.

Applying. The archive is untrusted, so every member passes the checks below in a first pass
that writes nothing; only a diff that passes them all is applied, so a hostile or malformed
diff is refused before the root filesystem is touched. Failures that only the second pass can
see (I/O errors) leave a partly applied layer: the caller discards the container's writable
layer on any error.
- names: no absolute paths, no `..`, nothing written or deleted through a symlink, whether the
  symlink is in the image or was created earlier in the same diff;
- hard links: only to a regular file inside the destination, never to the entry itself;
- device nodes and FIFOs: refused unless allow_devices; a 0:0 character device (an overlay
  whiteout in disguise) always;
- set-uid and set-gid bits of files, and file capabilities (security.capability), are kept
  only with keep_setid (the new container runs as root or privileged, and so could make such
  files itself); otherwise they are stripped, so that a checkpoint cannot hand a non-root
  container a set-uid-root binary it could not have made. Sticky bits and set-gid on
  directories (group inheritance, no privilege) are kept;
- Limits bound bytes, entries and path lengths.
Deletions (deleted.files) run before the tar, then OCI whiteouts in the tar (`.wh.<name>`,
`.wh..wh..opq`, as containerd's gzip rootfs-diff uses) apply in stream order.

The destination is the container's root filesystem as the container will see it: a mounted
overlay (lower image + fresh upper), where the kernel turns deletions into whiteouts and copies
up parents with the right metadata, or a plain directory tree.
"""
from __future__ import annotations

import errno
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from oci.layers import clean_member_path, remove_path

from .errors import ArchiveError, ArchiveFormatError, UnsafeArchive
from .limits import Budget, Limits
from .tarstream import (add_xattr, copy_exactly, corrupt_stream_errors, decompressed,
                        detect_compression, member_mtime_ns, member_name, member_xattrs,
                        members, open_tar, safe_member_path, set_exact_mtime, translate_unsafe)

# Paths the runtime mounts over or manages: what lies beneath them in the upper directory is
# a mount point placeholder, not container state. Always excluded, with the caller's own.
DEFAULT_EXCLUDES = ("/proc", "/sys", "/dev", "/etc/hosts", "/etc/resolv.conf", "/etc/hostname",
                    "/run/secrets")

OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XWHITEOUT_XATTR = "trusted.overlay.whiteout"
_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_UNSUPPORTED_OVERLAY_XATTRS = {"trusted.overlay.redirect": "redirect_dir",
                               "trusted.overlay.metacopy": "metacopy"}
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_AUFS_META_PREFIX = ".wh..wh."
_FILE_MODE_WHILE_WRITING = 0o600


# ================================================================ writing (checkpoint)

def write_rootfs_diff(upper_dir: Path, out_tar: Path, exclude: Iterable[str] = (), *,
                      lower_dirs: Sequence[Path] = ()) -> list[str]:
    """Write the added/changed entries of `upper_dir` to `out_tar` (plain tar, mode 0600).

    Returns the deleted container paths (absolute, sorted) for deleted.files. `exclude` holds
    container paths (volume and mount destinations) left out with everything below them, in
    addition to DEFAULT_EXCLUDES. `lower_dirs` (top layer first) lets opaque directories be
    expressed as the exact lower entries they hide; see the module docstring.
    """
    upper_dir = Path(upper_dir)
    walker = _UpperWalker(upper_dir, _Excludes([*DEFAULT_EXCLUDES, *exclude]),
                          [Path(p) for p in lower_dirs])
    fd = os.open(out_tar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 _FILE_MODE_WHILE_WRITING)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT,
                              encoding="utf-8", errors="surrogateescape") as tar:
                walker.walk(tar, upper_dir, PurePosixPath())
    except BaseException:
        _unlink_quietly(out_tar)
        raise
    return sorted(walker.deleted)


class _Excludes:
    def __init__(self, paths: Iterable[str]):
        self.paths = {self._normalise(p) for p in paths}

    @staticmethod
    def _normalise(path: str) -> str:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ValueError(f"exclude path {path!r} contains '..'")
        return "/" + "/".join(parts)

    def covers(self, container_path: str) -> bool:
        """True if the path or one of its ancestors is excluded."""
        if "/" in self.paths:
            return True
        probe = container_path
        while probe:
            if probe in self.paths:
                return True
            probe = probe.rpartition("/")[0]
        return False


@dataclass
class _UpperWalker:
    upper: Path
    excludes: _Excludes
    lower_dirs: list[Path]
    deleted: set[str] = field(default_factory=set)
    # (st_dev, st_ino) -> member name, so a second name of the same file becomes a hard link.
    first_names: dict[tuple[int, int], str] = field(default_factory=dict)

    def walk(self, tar: tarfile.TarFile, directory: Path, rel: PurePosixPath) -> None:
        for name in sorted(os.listdir(directory)):
            child_rel = rel / name
            container_path = "/" + str(child_rel)
            if self.excludes.covers(container_path):
                continue
            path = directory / name
            st = os.lstat(path)
            xattrs = _read_xattrs(path)
            _refuse_unsupported_overlay_entries(path, xattrs)
            if _is_whiteout(st, xattrs):
                self.deleted.add(container_path)
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue  # tar cannot hold sockets; a restored process re-creates its own
            if stat.S_ISDIR(st.st_mode) and xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y":
                self.deleted.update(self._opaque_deletions(child_rel, path))
            self._add_entry(tar, path, str(child_rel), st, xattrs)
            if stat.S_ISDIR(st.st_mode):
                self.walk(tar, path, child_rel)

    def _opaque_deletions(self, rel: PurePosixPath, upper_path: Path) -> list[str]:
        if not self.lower_dirs:
            return ["/" + str(rel)]
        return self._hidden_lower_entries(rel, upper_path)

    def _hidden_lower_entries(self, rel: PurePosixPath, upper_path: Path) -> list[str]:
        """Lower entries under `rel` that the opaque upper directory hides, as deletions."""
        hidden = []
        for name, lower_is_dir in sorted(_merged_lower_children(self.lower_dirs, rel).items()):
            child_rel = rel / name
            container_path = "/" + str(child_rel)
            if self.excludes.covers(container_path):
                continue
            try:
                st = os.lstat(upper_path / name)
            except FileNotFoundError:
                hidden.append(container_path)
                continue
            # An upper directory below an opaque one also hides its lower namesake's contents,
            # unless it is opaque itself (its own visit records those).
            if (lower_is_dir and stat.S_ISDIR(st.st_mode)
                    and _read_xattr(upper_path / name, OVERLAY_OPAQUE_XATTR) != b"y"):
                hidden.extend(self._hidden_lower_entries(child_rel, upper_path / name))
        return hidden

    def _add_entry(self, tar: tarfile.TarFile, path: Path, name: str, st: os.stat_result,
                   xattrs: dict[str, bytes]) -> None:
        info = tarfile.TarInfo(name)
        info.uid, info.gid, info.uname, info.gname = st.st_uid, st.st_gid, "", ""
        info.mode = stat.S_IMODE(st.st_mode)
        set_exact_mtime(info, st.st_mtime_ns)
        for xname, value in sorted(xattrs.items()):
            if not xname.startswith(_OVERLAY_XATTR_PREFIXES):
                add_xattr(info, xname, value)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            first = self.first_names.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if first is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first
                tar.addfile(info)
                return
            if st.st_nlink > 1:
                self.first_names[(st.st_dev, st.st_ino)] = name
            info.type, info.size = tarfile.REGTYPE, st.st_size
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as data:
                tar.addfile(info, data)  # raises if the file shrank meanwhile
            return
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:  # pragma: no cover - no other file types exist on Linux
            raise ArchiveError(f"{path}: unsupported file type {stat.S_IFMT(mode):o}")
        tar.addfile(info)


def _merged_lower_children(lower_dirs: list[Path], rel: PurePosixPath) -> dict[str, bool]:
    """Names (-> is a directory) overlayfs would show in `rel` of the lower layers alone."""
    children: dict[str, bool] = {}
    whited_out: set[str] = set()
    for layer in _layers_showing_dir(lower_dirs, rel):
        for name in sorted(os.listdir(layer / rel)):
            if name in children or name in whited_out:
                continue  # a higher layer decided this name already
            path = layer / rel / name
            st = os.lstat(path)
            if _is_whiteout(st, _read_xattrs(path)):
                whited_out.add(name)
            else:
                children[name] = stat.S_ISDIR(st.st_mode)
    return children


def _layers_showing_dir(lower_dirs: list[Path], rel: PurePosixPath) -> list[Path]:
    """The layers whose copy of directory `rel` is part of the merged lower view."""
    visible = list(lower_dirs)
    prefix = PurePosixPath()
    for part in rel.parts:
        prefix = prefix / part
        merged = []
        for layer in visible:
            path = layer / prefix
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                break  # a file or whiteout here hides this name in every layer below
            merged.append(layer)
            if _read_xattr(path, OVERLAY_OPAQUE_XATTR) == b"y":
                break
        visible = merged
    return visible


def _is_whiteout(st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    # The xattr form (kernel 6.7+) used where a 0:0 device cannot be created.
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and _OVERLAY_XWHITEOUT_XATTR in xattrs


def _refuse_unsupported_overlay_entries(path: Path, xattrs: dict[str, bytes]) -> None:
    for xattr, feature in _UNSUPPORTED_OVERLAY_XATTRS.items():
        if xattr in xattrs:
            raise ArchiveError(f"{path} carries {xattr}: its content lives in a lower layer "
                               f"(overlay {feature}=on), which a rootfs diff cannot express; "
                               f"mount the container's overlay with {feature}=off")


def _read_xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    values = {}
    for name in names:
        value = _read_xattr(path, name)
        if value is not None:
            values[name] = value
    return values


def _read_xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ================================================================ applying (restore)

def apply_rootfs_diff(diff_tar: Path | None, deleted: Sequence[str], dest_rootfs: Path,
                      limits: Limits = Limits(), *, allow_devices: bool = False,
                      keep_setid: bool = False) -> None:
    """Delete `deleted` (container paths) from `dest_rootfs`, then unpack `diff_tar` into it.

    `diff_tar` may be None (no rootfs-diff.tar in the archive), a plain tar (CRI-O, Podman,
    pyshim) or a gzip/zstd tar with OCI whiteouts (containerd). Raises UnsafeArchive (or its
    ArchiveLimitExceeded) naming the member and the reason, ArchiveFormatError if the tar is
    damaged; see the module docstring for what is refused and what happens on failure.
    """
    dest_rootfs = Path(dest_rootfs)
    if not stat.S_ISDIR(os.lstat(dest_rootfs).st_mode):
        raise ArchiveError(f"restore destination {dest_rootfs} is not a directory")
    label = str(diff_tar) if diff_tar is not None else "deleted.files"

    check = _DiffApplier(dest_rootfs, label, limits, allow_devices, write=False)
    check.delete_paths(deleted)
    if diff_tar is not None:
        check.unpack(Path(diff_tar))

    apply = _DiffApplier(dest_rootfs, label, limits, allow_devices, write=True,
                         keep_setid=keep_setid)
    apply.delete_paths(deleted)
    if diff_tar is not None:
        apply.unpack(Path(diff_tar))


class _DiffApplier:
    """One pass over deletions and diff members: with write=False it only checks, against a
    model of what the diff has done so far plus the destination as it is now."""

    def __init__(self, dest: Path, archive: str, limits: Limits, allow_devices: bool,
                 write: bool, keep_setid: bool = False):
        self.dest = dest
        self.archive = archive
        self.budget = Budget(limits, archive)
        self.allow_devices = allow_devices
        self.write = write
        self.keep_setid = keep_setid
        self.kinds: dict[str, str] = {}   # member name -> "dir" | "file" | "symlink" | "special"
        self.removed: set[str] = set()    # names deleted so far (deleted.files, whiteouts)
        self.written: set[str] = set()    # names this diff wrote (kept by opaque markers)
        self.dir_times: list[tuple[Path, int]] = []

    # ------------------------------------------------------------ deletions

    def delete_paths(self, paths: Sequence[str]) -> None:
        for path in paths:
            # Container paths are absolute ("/etc/motd"); inside dest they are relative.
            name = self._clean(path.lstrip("/") or ".", f"deleted path {path!r}")
            self.budget.charge_entry(name)
            self._delete(name, f"deleted path {path!r}")

    def _delete(self, name: str, what: str) -> None:
        if name == ".":
            raise UnsafeArchive(what, "would delete the whole root filesystem", self.archive)
        self._check_ancestors(name, what, deleting=True)
        self.removed.add(name)
        self.kinds.pop(name, None)
        if self.write:
            parent = self._existing_parent(name, what)
            if parent is not None:
                remove_path(parent / PurePosixPath(name).name)

    def _existing_parent(self, name: str, what: str) -> Path | None:
        """The real directory holding `name`, or None if it (so `name`) does not exist."""
        current = self.dest
        for part in PurePosixPath(name).parts[:-1]:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchive(what, f"parent {part!r} is a symlink; refusing to delete "
                                    "through it", self.archive)
            if not stat.S_ISDIR(st.st_mode):
                return None
        return current

    # ------------------------------------------------------------ the tar

    def unpack(self, diff_tar: Path) -> None:
        try:
            with open(diff_tar, "rb") as raw:
                compression = detect_compression(raw)
                with decompressed(raw, compression) as stream, \
                        open_tar(stream, seekable=compression == "none") as tar:
                    for member in members(tar):
                        self._member(tar, member)
        except corrupt_stream_errors() as exc:
            raise ArchiveFormatError(self.archive, f"not a readable (compressed) tar: {exc}") \
                from None
        for path, mtime_ns in reversed(self.dir_times):
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member_name(member, self.archive)
        linkname = member.linkname if (member.issym() or member.islnk()) else ""
        self.budget.charge_entry(name, member.size if member.isreg() else 0, linkname)
        if name == ".":
            # The root's own owner and mode belong to the image, not to the diff.
            if not member.isdir():
                raise UnsafeArchive(member.name, "root entry is not a directory", self.archive)
            return
        rel = PurePosixPath(name)
        if any(p.startswith(WHITEOUT_PREFIX) for p in rel.parts[:-1]):
            raise UnsafeArchive(member.name, "a whiteout name used as a directory", self.archive)
        base, parent = rel.name, str(rel.parent)
        if base == OPAQUE_MARKER:
            self._make_opaque(parent, member.name)
        elif base.startswith(_AUFS_META_PREFIX):
            return  # aufs bookkeeping, meaningless here
        elif base.startswith(WHITEOUT_PREFIX):
            victim = base[len(WHITEOUT_PREFIX):]
            if victim in ("", ".", ".."):
                raise UnsafeArchive(member.name, f"whiteout of {victim!r}", self.archive)
            self._delete(str(rel.parent / victim), member.name)
        else:
            self._entry(tar, member, name)

    def _make_opaque(self, parent: str, member: str) -> None:
        """OCI opaque marker: drop what the directory held before this diff, keep what the
        diff itself wrote there."""
        if parent != ".":
            self._check_ancestors(parent + "/" + OPAQUE_MARKER, member)
        if not self.write:
            return
        directory = (self.dest if parent == "." else
                     safe_member_path(self.dest, parent + "/" + OPAQUE_MARKER,
                                      create_parents=True, archive=self.archive).parent)
        for child in os.listdir(directory):
            child_name = child if parent == "." else f"{parent}/{child}"
            if child_name not in self.written:
                remove_path(directory / child)

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        self._check_ancestors(name, member.name)
        kind = self._kind_of(member, name)
        source = self._check_hardlink(member, name) if member.islnk() else None
        self.kinds[name] = kind
        self.removed.discard(name)
        if self.write:
            self._write(tar, member, name, source)
        self._mark_written(name)

    def _mark_written(self, name: str) -> None:
        # Ancestors too: a parent the diff created implicitly is the diff's own as well.
        while name != "." and name not in self.written:
            self.written.add(name)
            name = str(PurePosixPath(name).parent)

    def _kind_of(self, member: tarfile.TarInfo, name: str) -> str:
        if member.isreg() or member.islnk():
            return "file"
        if member.isdir():
            return "dir"
        if member.issym():
            return "symlink"
        if member.ischr() or member.isblk() or member.isfifo():
            if member.ischr() and member.devmajor == 0 and member.devminor == 0:
                raise UnsafeArchive(member.name, "character device 0:0 is an overlay whiteout "
                                    "in disguise", self.archive)
            if not self.allow_devices:
                kind = "FIFO" if member.isfifo() else "device node"
                raise UnsafeArchive(member.name, f"{kind} not allowed in a rootfs diff",
                                    self.archive)
            return "special"
        raise UnsafeArchive(member.name, f"unsupported tar member type {member.type!r}",
                            self.archive)

    def _check_hardlink(self, member: tarfile.TarInfo, name: str) -> str:
        target = self._clean(member.linkname, member.name)
        if target == name or target == ".":
            raise UnsafeArchive(member.name, f"hard link to itself or the root ({target!r})",
                                self.archive)
        target_on_disk = self._check_ancestors(target, member.name)
        kind = self.kinds.get(target)
        if kind is None and target not in self.removed and target_on_disk:
            kind = self._kind_on_disk(target)
        if kind != "file":
            raise UnsafeArchive(member.name, f"hard link target {member.linkname!r} is "
                                f"{'missing' if kind is None else 'a ' + kind}, not a regular "
                                "file", self.archive)
        return target

    def _kind_on_disk(self, name: str) -> str | None:
        try:
            st = os.lstat(self.dest / name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISREG(st.st_mode):
            return "file"
        if stat.S_ISDIR(st.st_mode):
            return "dir"
        return "symlink" if stat.S_ISLNK(st.st_mode) else "special"

    def _check_ancestors(self, name: str, member: str, deleting: bool = False) -> bool:
        """Every existing ancestor of `name` must be a real directory, whether the diff made
        it or the image had it: nothing is written or deleted through a symlink. When
        `deleting`, an ancestor that is a file or device just means there is nothing to delete.

        Returns whether all ancestors exist on disk as real directories right now, i.e.
        whether looking `name` up on disk means anything.
        """
        on_disk = True  # below a missing, deleted or replaced ancestor the disk has no say
        prefix = PurePosixPath()
        for part in PurePosixPath(name).parts[:-1]:
            prefix = prefix / part
            key = str(prefix)
            disk_kind = self._kind_on_disk(key) if on_disk else None
            kind = self.kinds.get(key)
            if kind is None and key in self.removed:
                on_disk = False
                continue
            if kind is None:
                if not on_disk or disk_kind is None:
                    on_disk = False
                    continue
                kind = disk_kind
            if kind != "dir":
                if deleting and kind != "symlink":
                    return False
                raise UnsafeArchive(member, f"parent {key!r} is a {kind}, not a directory; "
                                    "refusing to write through it", self.archive)
            if disk_kind != "dir":
                on_disk = False  # the diff makes a fresh directory here
        return on_disk

    # ------------------------------------------------------------ writing one member

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str,
               hardlink_source: str | None) -> None:
        target = safe_member_path(self.dest, name, create_parents=True, archive=self.archive)
        existing_is_dir = _is_real_dir(target)
        if not (member.isdir() and existing_is_dir):
            remove_path(target)
        if member.isdir():
            if not existing_is_dir:
                os.mkdir(target, 0o700)
        elif member.islnk():
            source = safe_member_path(self.dest, hardlink_source, archive=self.archive)
            if not stat.S_ISREG(os.lstat(source).st_mode):
                raise UnsafeArchive(member.name, "hard link target is not a regular file",
                                    self.archive)
            os.link(source, target, follow_symlinks=False)
            return  # the link shares its inode, and so its metadata, with the target
        elif member.isreg():
            self._write_file(tar, member, target)
        elif member.issym():
            os.symlink(member.linkname, target)
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        _apply_metadata(target, member, self.keep_setid)
        mtime = member_mtime_ns(member)
        if member.isdir():
            self.dir_times.append((target, mtime))  # children added later would bump it
        else:
            os.utime(target, ns=(mtime, mtime), follow_symlinks=False)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
        # O_EXCL|O_NOFOLLOW: the old entry was just removed; anything there now is a race.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     _FILE_MODE_WHILE_WRITING)
        with os.fdopen(fd, "wb") as out:
            src = tar.extractfile(member)
            if src is not None and member.size:
                copy_exactly(src, out, member.size, f"{self.archive} member {member.name!r}")

    def _clean(self, name: str, what: str) -> str:
        return str(translate_unsafe(lambda: clean_member_path(name), what, self.archive))


_SETID_BITS = stat.S_ISUID | stat.S_ISGID
FILE_CAPABILITY_XATTR = "security.capability"


def _apply_metadata(path: Path, member: tarfile.TarInfo, keep_setid: bool) -> None:
    # chown first: it clears setuid/setgid and security.capability, which come after.
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    strip_setid = not member.isdir() and not keep_setid
    if not member.issym():
        os.chmod(path, member.mode & 0o7777 & (~_SETID_BITS if strip_setid else 0o7777))
    for name, value in member_xattrs(member):
        if name.startswith(_OVERLAY_XATTR_PREFIXES):
            continue  # only overlayfs itself decides what is a whiteout or opaque
        if name == FILE_CAPABILITY_XATTR and strip_setid:
            continue
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:
            # e.g. security.selinux on a host without SELinux: the file itself is still right.
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
