"""Whole checkpoint archives: writing one from a prepared directory, reading one lazily.

Writing never exposes a partial or readable-by-others archive: the tar is built under a
temporary name in the destination directory (mode 0600 from creation; it holds every memory
page of the container), fsynced, and only then renamed into place. Readers such as the kubelet
see the complete archive or none.

Reading treats the archive as hostile input. `open_archive` makes one pass over the tar to
index its members (names, types, sizes; no data kept but the small JSON metadata), validating
names, duplicates and the members a restore needs; every later call re-reads the stream from
the already-open file, so nothing big is ever held in memory and the archive cannot be swapped
underneath the reader. Plain tars are read by seeking past file data; gzip and zstd ones
(Podman's --compress) are streamed.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .archive_format import (BIND_MOUNTS, CHECKPOINT_DIR, CONFIG_DUMP, DELETED_FILES,
                             LOG_MEMBERS, MAX_METADATA_BYTES, METADATA_MEMBERS, ROOTFS_DIFF_TAR,
                             SPEC_DUMP, STATUS_DUMP, BindMount, CheckpointConfig,
                             bind_mounts_from_json, check_spec_shape, deleted_files_from_json,
                             json_object_from)
from .background_hash import BackgroundHash, GrowingFileHash
from .errors import ArchiveError, ArchiveFormatError, UnsafeArchive
from .limits import Budget, Limits
from .plain_tar_writer import PlainTarWriter
from .tarstream import (COMPRESSIONS, COPY_CHUNK, ForwardReader, copy_exactly, copy_member_data,
                        corrupt_stream_errors, decompressed, detect_compression, member_name, members,
                        open_tar, safe_member_path, set_exact_mtime)

_CHECKPOINT_PREFIX = CHECKPOINT_DIR + "/"
_INVENTORY = _CHECKPOINT_PREFIX + "inventory.img"  # CRIU writes it first; no restore without it
_PRIVATE = 0o600
GZIP_LEVEL = 6
# A compressed archive's bytes pass through Python (a plain one's do not: plain_tar_writer). They are
# copied 16 MiB at a time: each chunk's read and write release the GIL,
# and in a daemon whose other threads want it, taking it back costs up to the switch interval (5 ms).
# Measured beside one busy thread: 512 MiB in 4.4 s with 1 MiB chunks, 1.1 s with 16 MiB (0.4 s alone).
ARCHIVE_COPY_CHUNK = 16 << 20
_HASH_BACKLOG = 4  # chunks waiting for the hashing thread: at most 64 MiB held
ZSTD_LEVEL = 3


# ================================================================ writing

@dataclass(frozen=True)
class ArchiveDigest:
    """What write_archive learnt about the bytes it wrote, so that nobody reads them again to learn it:
    the digest and size of a checkpoint image's layer (the archive's own bytes) and its diff_id."""
    digest: str   # "sha256:<hex>" of the archive file as written
    diff_id: str  # "sha256:<hex>" of the uncompressed tar (== digest for a plain tar)
    size: int     # bytes in the archive file

    def to_json(self) -> dict:
        return {"digest": self.digest, "diffId": self.diff_id, "size": self.size}

    @classmethod
    def from_json(cls, doc: object) -> "ArchiveDigest | None":
        """None unless `doc` is a well-formed to_json() result (a daemon of an older version sends none)."""
        if not isinstance(doc, dict):
            return None
        digest, diff_id, size = doc.get("digest"), doc.get("diffId"), doc.get("size")
        if not (isinstance(digest, str) and isinstance(diff_id, str) and isinstance(size, int)):
            return None
        if not (_is_sha256(digest) and _is_sha256(diff_id)) or size < 0:
            return None
        return cls(digest, diff_id, size)


def _is_sha256(digest: str) -> bool:
    hexpart = digest.removeprefix("sha256:")
    return digest.startswith("sha256:") and len(hexpart) == 64 and all(c in "0123456789abcdef" for c in hexpart)


def write_archive(out_path: Path, members_dir: Path, compression: str = "none",
                  mode: int = _PRIVATE, before_rename: Callable[[], None] | None = None,
                  tmp_path: Path | None = None, durable: bool = True) -> ArchiveDigest:
    """Pack `members_dir` (checkpoint/, config.dump, spec.dump, ...) into `out_path`.

    The checkpoint/ directory entry comes first (checkpointctl requires a real one), then its
    images, then the other members in name order. Only regular files and directories are
    packed. On any error the temporary file is removed and `out_path` is left as it was;
    `before_rename` may raise to refuse the finished archive at the last moment (a caller's
    deadline passed while it was written). `tmp_path` names the temporary file (beside `out_path`)
    when the caller must be able to find it after a crash; by default it gets a random hidden name.

    Returns the archive's digest, diff_id and size, computed from the bytes as they were written.
    `durable` False skips the fsyncs, for throwaway archives (a move's, which lives for minutes and is
    worthless after a host crash anyway); the rename still makes the archive appear whole or not at all
    to every process.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
    out_path, members_dir = Path(out_path), Path(members_dir)
    _check_members_dir(members_dir)
    # mkstemp: O_EXCL and mode 0600 regardless of umask, so no moment of wider access.
    if tmp_path is None:
        fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    else:
        tmp = str(tmp_path)
        # Read and write: the plain archive's digest is computed by reading it back (GrowingFileHash).
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            if compression == "none":
                result = _write_plain(raw.fileno(), members_dir)
            else:
                result = _write_compressed(raw, members_dir, compression)
            os.fchmod(raw.fileno(), mode)
            if durable:
                os.fsync(raw.fileno())
        if before_rename is not None:
            before_rename()
        os.rename(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        # The rename is durable only once the directory entry is on disk too.
        dirfd = os.open(out_path.parent, os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    return result


def _write_plain(fd: int, members_dir: Path) -> ArchiveDigest:
    """The plain archive, its members' data copied by the kernel (plain_tar_writer) and hashed by reading
    the file back behind the copy, from the page cache (GrowingFileHash): the digest is of the bytes in
    the file, and no byte passes through this interpreter's buffers."""
    hasher = GrowingFileHash(fd)
    try:
        tar = PlainTarWriter(fd, progress=hasher.written)
        for info, source in _archive_entries(members_dir):
            tar.add(info, source)
        tar.close()
        digest = "sha256:" + hasher.hexdigest(tar.size)
    finally:
        hasher.close()
    return ArchiveDigest(digest, digest, tar.size)


def _write_compressed(raw: BinaryIO, members_dir: Path, compression: str) -> ArchiveDigest:
    """A gzip or zstd archive: the bytes must pass through the compressor, so tarfile writes them; the
    tar and the compressed file are hashed as they pass (BackgroundHash)."""
    written = _HashingWriter(raw)
    tar_stream = written
    try:
        with _compressing(written, compression) as compressed:
            tar_stream = _HashingWriter(compressed)
            # "w", not the stream mode "w|": tarfile's stream buffer re-slices every 10 KiB record
            # (measured: twice the time); a sequential writer is all "w" needs here.
            with tarfile.open(fileobj=tar_stream, mode="w", format=tarfile.PAX_FORMAT,
                              encoding="utf-8", errors="surrogateescape",
                              copybufsize=ARCHIVE_COPY_CHUNK) as tar:
                for info, source in _archive_entries(members_dir):
                    _add_with_tarfile(tar, info, source)
        return ArchiveDigest(written.digest(), tar_stream.digest(), written.size)
    finally:
        written.close()
        tar_stream.close()


class _HashingWriter:
    """A sequential sink that hashes and counts what passes through it (the tar is written once and
    its digest is known when the last byte is; building an image from it reads nothing again). The
    hash runs in a thread beside the writing (BackgroundHash); close() ends it on any outcome."""

    def __init__(self, sink: BinaryIO):
        self._sink = sink
        self._hash = BackgroundHash(backlog=_HASH_BACKLOG)
        self.size = 0

    def write(self, data) -> int:
        self._hash.update(data)
        view = memoryview(data)
        while view:  # an unbuffered file may write less than asked
            done = self._sink.write(view)
            view = view[done if done is not None else len(view):]
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._sink.flush()

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def close(self) -> None:
        self._hash.close()


def _check_members_dir(members_dir: Path) -> None:
    """Refuse to write an archive that open_archive would reject."""
    problems = []
    if not _lstat_is(members_dir / CHECKPOINT_DIR, stat.S_ISDIR):
        problems.append(f"{CHECKPOINT_DIR}/ (CRIU image directory)")
    elif not _lstat_is(members_dir / _INVENTORY, stat.S_ISREG):
        problems.append(_INVENTORY)
    for name in (CONFIG_DUMP, SPEC_DUMP):
        if not _lstat_is(members_dir / name, stat.S_ISREG):
            problems.append(name)
    if problems:
        raise ArchiveError(f"cannot write a checkpoint archive from {members_dir}: missing "
                           + ", ".join(problems))


def _lstat_is(path: Path, predicate) -> bool:
    try:
        return predicate(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


@contextmanager
def _compressing(raw: BinaryIO, compression: str) -> Iterator[BinaryIO]:
    if compression == "none":
        with nullcontext(raw) as sink:
            yield sink
    elif compression == "gzip":
        # mtime=0: the same content gives the same bytes (image layers get reproducible digests).
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as sink:
            yield sink
    else:
        import zstandard
        # threads=-1: one worker per CPU; page images are large and compress well in parallel.
        # write_checksum: readers can then tell a damaged archive from a valid one.
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1, write_checksum=True)
        with compressor.stream_writer(raw, closefd=False) as sink:
            yield sink


def _archive_entries(members_dir: Path) -> Iterator[tuple[tarfile.TarInfo, Path | None]]:
    """What the archive holds, in its order: the checkpoint/ directory entry first (checkpointctl
    requires a real one), then its images, then the other members in name order; each with its source
    file if it is a regular file."""
    yield from _tree_entries(members_dir / CHECKPOINT_DIR, CHECKPOINT_DIR)
    for name in sorted(os.listdir(members_dir)):
        if name != CHECKPOINT_DIR:
            yield from _tree_entries(members_dir / name, name)


def _tree_entries(path: Path, arcname: str) -> Iterator[tuple[tarfile.TarInfo, Path | None]]:
    st = os.lstat(path)
    info = tarfile.TarInfo(arcname)
    info.uid, info.gid, info.uname, info.gname = st.st_uid, st.st_gid, "", ""
    info.mode = stat.S_IMODE(st.st_mode)
    set_exact_mtime(info, st.st_mtime_ns)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        yield info, None
        for name in sorted(os.listdir(path)):
            yield from _tree_entries(path / name, f"{arcname}/{name}")
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        yield info, path
    else:
        raise ArchiveError(f"cannot pack {path}: only regular files and directories belong in a "
                           "checkpoint archive")


def _add_with_tarfile(tar: tarfile.TarFile, info: tarfile.TarInfo, source: Path | None) -> None:
    if source is None:
        tar.addfile(info)
        return
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as data:
        tar.addfile(info, data)  # raises if the file shrank while being packed


# ================================================================ reading

@dataclass(frozen=True)
class MemberInfo:
    name: str   # normalised: "checkpoint", "checkpoint/pages-1.img", "config.dump"
    kind: str   # "file", "dir", "symlink", "hardlink" or "special"
    size: int   # bytes of content (0 for anything but files)
    # Where a plain (not sparse) file's content starts in the uncompressed tar; -1 otherwise. In a
    # plain tar it is the file's offset, so the content is read in place, without a pass over the headers.
    offset: int = -1


def open_archive(path: Path, limits: Limits = Limits()) -> CheckpointArchive:
    """Open and index a checkpoint archive written by pyshim, CRI-O, Podman or containerd.

    Raises ArchiveFormatError if it is not a readable tar (plain, gzip or zstd), is truncated,
    or lacks config.dump, spec.dump or CRIU images; UnsafeArchive for hostile member names.
    Use as a context manager (or call close()) to release the file.
    """
    path = Path(path)
    raw = open(path, "rb")
    try:
        return CheckpointArchive(path, raw, limits)
    except BaseException:
        raw.close()
        raise


class CheckpointArchive:
    def __init__(self, path: Path, raw: BinaryIO, limits: Limits):
        self.path = path
        self._raw = raw
        self._label = str(path)
        self.compression = detect_compression(raw)
        self._members: dict[str, MemberInfo] = {}
        self._metadata: dict[str, bytes] = {}
        self._index(limits)
        self._check_required_members()
        self._config = CheckpointConfig.from_json(self._metadata[CONFIG_DUMP], self._label)
        self._spec = check_spec_shape(json_object_from(self._metadata[SPEC_DUMP], SPEC_DUMP,
                                                       self._label), self._label)
        self._status = (json_object_from(self._metadata[STATUS_DUMP], STATUS_DUMP, self._label)
                        if STATUS_DUMP in self._metadata else None)
        self._deleted = (deleted_files_from_json(self._metadata[DELETED_FILES], self._label)
                         if DELETED_FILES in self._metadata else [])
        self._bind_mounts = (bind_mounts_from_json(self._metadata[BIND_MOUNTS], self._label)
                             if BIND_MOUNTS in self._metadata else [])

    # ------------------------------------------------------------ life cycle

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> CheckpointArchive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ the file itself

    def file_stat(self) -> os.stat_result:
        """fstat of the file indexed at open (the path may name another file by now)."""
        return os.fstat(self._raw.fileno())

    def reopen(self) -> BinaryIO:
        """A new read handle, with its own position, on the very file indexed at open."""
        return open(f"/proc/self/fd/{self._raw.fileno()}", "rb")

    # ------------------------------------------------------------ metadata

    def config(self) -> CheckpointConfig:
        return self._config

    def spec(self) -> dict[str, Any]:
        return self._spec

    def status(self) -> dict[str, Any] | None:
        """status.dump (the CRI ContainerStatus), which only containerd and pyshim write."""
        return self._status

    def deleted_files(self) -> list[str]:
        return list(self._deleted)

    def bind_mounts(self) -> list[BindMount]:
        return list(self._bind_mounts)

    def metadata_member(self, name: str) -> bytes | None:
        """Raw bytes of a small JSON member (network.status, pod.options, ...), if present."""
        return self._metadata.get(name)

    # ------------------------------------------------------------ the index

    def member_names(self) -> list[str]:
        return list(self._members)

    def has_member(self, name: str) -> bool:
        return name in self._members

    def member_size(self, name: str) -> int:
        return self._member(name).size

    def log_member(self) -> str | None:
        """The container log copy, whichever engine's name it has."""
        return next((n for n in LOG_MEMBERS if self._is_file(n)), None)

    def checkpoint_members(self) -> list[MemberInfo]:
        """The index's entries under checkpoint/: CRIU's images (and any directories)."""
        return [m for m in self._members.values() if m.name.startswith(_CHECKPOINT_PREFIX)]

    def checkpoint_size(self) -> int:
        """Bytes of CRIU images (what restoring needs on disk before CRIU even starts)."""
        return sum(m.size for m in self._members.values()
                   if m.kind == "file" and m.name.startswith(_CHECKPOINT_PREFIX))

    def rootfs_diff_size(self) -> int:
        return self._members[ROOTFS_DIFF_TAR].size if self._is_file(ROOTFS_DIFF_TAR) else 0

    # ------------------------------------------------------------ extraction

    def extract_checkpoint_images(self, dest: Path, limits: Limits = Limits()) -> int:
        """Unpack checkpoint/ into `dest` (created 0700, must be empty); returns bytes written.

        Only regular files (written 0600) and directories are accepted: CRIU images are
        nothing else, and a symlink or device there is an attack on whoever reads them next.
        """
        dest = Path(dest)
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.listdir(dest):
            raise ArchiveError(f"destination for CRIU images {dest} is not empty")
        images = [m for m in self._members.values() if m.name.startswith(_CHECKPOINT_PREFIX)]
        # Refuse from the index before writing anything; the stream pass checks again.
        budget = Budget(limits, self._label)
        for info in images:
            if info.kind not in ("file", "dir"):
                raise UnsafeArchive(info.name, f"CRIU images are regular files and "
                                    f"directories, this is a {info.kind}", self._label)
            budget.charge_entry(info.name, info.size)
        budget = Budget(limits, self._label)
        if self._in_place(images):
            # Straight from the index: the names, kinds and sizes checked at open, the content read at
            # its offset in the very file indexed, with no second pass parsing every header.
            try:
                with self.reopen() as raw:
                    for info in images:
                        _extract_indexed_image(raw, info, info.name[len(_CHECKPOINT_PREFIX):], dest, budget,
                                               self._label)
            except corrupt_stream_errors() as exc:  # the file was cut short since it was indexed
                raise ArchiveFormatError(self._label, f"not a readable tar archive: {exc}") from None
            return budget.total_bytes
        pending = len(images)
        with self._scan() as (tar, stream):
            for member in stream:
                name = member_name(member, self._label)
                if not name.startswith(_CHECKPOINT_PREFIX):
                    continue
                _extract_image(tar, member, name[len(_CHECKPOINT_PREFIX):], dest, budget, self._label)
                pending -= 1
                if pending == 0:
                    break  # the rest of the stream is not CRIU images: skip decompressing it
        return budget.total_bytes

    def extract_member(self, name: str, dest_file: Path) -> None:
        """Copy one regular-file member (e.g. rootfs-diff.tar) to `dest_file` (mode 0600)."""
        size = self._require_file(name).size
        fd = os.open(dest_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, _PRIVATE)
        with os.fdopen(fd, "wb") as out, self.open_member(name) as src:
            copy_exactly(src, out, size, f"{self._label} member {name!r}")

    @contextmanager
    def open_member(self, name: str) -> Iterator[BinaryIO]:
        """Stream one regular-file member's content without unpacking anything else."""
        info = self._require_file(name)
        if self._in_place([info]):
            with self.reopen() as raw:
                raw.seek(info.offset)
                yield io.BufferedReader(_Window(raw, info.size))
            return
        with self._scan() as (tar, stream):
            for member in stream:
                if member_name(member, self._label) == name:
                    yield tar.extractfile(member)
                    return
        raise ArchiveFormatError(self._label, f"member {name!r} vanished while reading")

    # ------------------------------------------------------------ internals

    @contextmanager
    def _scan(self, verify_to_end: bool = False
              ) -> Iterator[tuple[tarfile.TarFile, Iterator[tarfile.TarInfo]]]:
        """A fresh pass over the tar. It reopens the already-open file through /proc, so
        passes have their own file positions yet read the very inode indexed at open.

        `verify_to_end` decompresses past the tar's end too, so the gzip CRC / zstd checksum
        and a truncated compressed stream are noticed even though the tar itself ended."""
        try:
            with open(f"/proc/self/fd/{self._raw.fileno()}", "rb") as raw, \
                    decompressed(raw, self.compression) as stream, \
                    open_tar(stream, seekable=self.compression == "none") as tar:
                yield tar, members(tar)
                if verify_to_end and self.compression != "none":
                    while stream.read(COPY_CHUNK):
                        pass
        except corrupt_stream_errors() as exc:
            raise ArchiveFormatError(self._label, f"not a readable (compressed) tar archive: "
                                     f"{exc}") from None

    def _index(self, limits: Limits) -> None:
        budget = Budget(limits, self._label)
        with self._scan(verify_to_end=True) as (tar, stream):
            for member in stream:
                name = member_name(member, self._label)
                linkname = member.linkname if (member.issym() or member.islnk()) else ""
                budget.charge_entry(name, 0, linkname)
                if name == ".":
                    continue
                info = MemberInfo(name, _kind(member), member.size if member.isreg() else 0,
                                  member.offset_data if member.isreg() and not member.issparse() else -1)
                self._add_to_index(member, info)
                if name in METADATA_MEMBERS and info.kind == "file":
                    self._metadata[name] = self._read_metadata(tar, member, info)

    def _add_to_index(self, member: tarfile.TarInfo, info: MemberInfo) -> None:
        previous = self._members.get(info.name)
        if previous is not None and not (previous.kind == info.kind == "dir"):
            # Tar semantics say the last copy wins, but tools disagree on which one they
            # show: an ambiguous archive is refused rather than guessed at.
            raise UnsafeArchive(member.name, "appears more than once in the archive",
                                self._label)
        self._members[info.name] = info

    def _read_metadata(self, tar: tarfile.TarFile, member: tarfile.TarInfo,
                       info: MemberInfo) -> bytes:
        if info.size > MAX_METADATA_BYTES:
            raise ArchiveFormatError(self._label, f"{info.name} is {info.size} bytes; metadata "
                                     f"members are at most {MAX_METADATA_BYTES}")
        data = tar.extractfile(member).read(info.size)
        if len(data) != info.size:
            raise ArchiveFormatError(self._label, f"{info.name} is truncated")
        return data

    def _check_required_members(self) -> None:
        missing = []
        for name in (CONFIG_DUMP, SPEC_DUMP):
            info = self._members.get(name)
            if info is None:
                missing.append(name)
            elif info.kind != "file":
                raise ArchiveFormatError(self._label, f"{name} is a {info.kind}, not a file")
        checkpoint = self._members.get(CHECKPOINT_DIR)
        if checkpoint is not None and checkpoint.kind != "dir":
            raise ArchiveFormatError(self._label, f"{CHECKPOINT_DIR} is a {checkpoint.kind}, "
                                     "not the CRIU image directory")
        if not self._is_file(_INVENTORY):
            missing.append(f"{CHECKPOINT_DIR}/ with CRIU images ({_INVENTORY})")
        if missing:
            raise ArchiveFormatError(self._label, "missing " + ", ".join(missing))

    def _in_place(self, infos: list[MemberInfo]) -> bool:
        """Whether these members' content can be read at its offset: a plain tar, no sparse files."""
        return self.compression == "none" and all(i.offset >= 0 for i in infos if i.kind == "file")

    def _member(self, name: str) -> MemberInfo:
        info = self._members.get(name)
        if info is None:
            raise ArchiveFormatError(self._label, f"has no member {name!r}")
        return info

    def _require_file(self, name: str) -> MemberInfo:
        info = self._member(name)
        if info.kind != "file":
            raise ArchiveFormatError(self._label, f"member {name!r} is a {info.kind}, "
                                     "not a regular file")
        return info

    def _is_file(self, name: str) -> bool:
        info = self._members.get(name)
        return info is not None and info.kind == "file"


def extract_checkpoint_images_from_stream(stream: BinaryIO, dest: Path, limits: Limits = Limits(),
                                          label: str = "checkpoint stream") -> int:
    """Unpack the checkpoint/ members of a plain tar read once from `stream` (a download, not seekable)
    into the empty `dest`; returns bytes written. The same rules as extract_checkpoint_images (regular
    files and directories only, safe names, the size budget) hold member by member, but nothing here
    has seen the archive whole: the caller must index the complete archive (open_archive) and compare
    before it uses anything in `dest`, and discard `dest` on any error."""
    budget = Budget(limits, label)
    extract_checkpoint_images_from_reader(ForwardReader(stream), dest, budget, label)
    return budget.total_bytes


@dataclass(frozen=True)
class ImageExtent:
    """Where an unpacked CRIU image's data lies in the archive: `size` bytes from `offset`."""
    rel: str     # its path under checkpoint/
    offset: int
    size: int


def extract_checkpoint_images_from_reader(reader: ForwardReader, dest: Path, budget: Budget,
                                          label: str) -> list[ImageExtent]:
    """extract_checkpoint_images_from_stream on a ForwardReader (whose sink may see the rest of the
    archive); returns where each unpacked file's data lies in the archive. Reads up to the tar's
    end-of-archive block."""
    dest = Path(dest)
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.listdir(dest):
        raise ArchiveError(f"destination for CRIU images {dest} is not empty")
    extents = []
    try:
        # tarfile parses the headers; the data of each member goes from the stream's chunks to its file.
        with open_tar(reader, seekable=True) as tar:
            for member in members(tar):
                name = member_name(member, label)
                if name.startswith(_CHECKPOINT_PREFIX):
                    rel = name[len(_CHECKPOINT_PREFIX):]
                    _extract_image(reader, member, rel, dest, budget, label)
                    if member.isreg():
                        extents.append(ImageExtent(rel, member.offset_data, member.size))
    except corrupt_stream_errors() as exc:
        raise ArchiveFormatError(label, f"not a readable tar archive: {exc}") from None
    return extents


def _extract_image(source: tarfile.TarFile | ForwardReader, member: tarfile.TarInfo, rel: str, dest: Path,
                   budget: Budget, label: str) -> None:
    """One checkpoint/ member into `dest`; its data from the open tar, or (a stream being unpacked as it
    arrives) straight from the stream's chunks."""
    budget.charge_entry(member.name, member.size if member.isreg() else 0)
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchive(member.name, f"CRIU images are regular files and directories, "
                            f"this is a {_kind(member)}", label)
    target = safe_member_path(dest, rel, create_parents=True, archive=label)
    if member.isdir():
        if not _lstat_is(target, stat.S_ISDIR):
            os.mkdir(target, 0o700)
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 _PRIVATE)
    what = f"{label} member {member.name!r}"
    # Not copy_file_range: measured, CRIU then read a 1 GiB image set ~5x slower at restore.
    if isinstance(source, ForwardReader):
        try:
            source.seek(member.offset_data)
            copy_member_data(source, fd, member.size, what)
        finally:
            os.close(fd)
        return
    with os.fdopen(fd, "wb") as out:
        copy_exactly(source.extractfile(member), out, member.size, what)


def _extract_indexed_image(raw: BinaryIO, info: MemberInfo, rel: str, dest: Path, budget: Budget,
                           label: str) -> None:
    """One checkpoint/ member into `dest` from its index entry (CheckpointArchive._in_place): the same
    rules as _extract_image, the content read at its offset."""
    budget.charge_entry(info.name, info.size)
    if info.kind not in ("file", "dir"):
        raise UnsafeArchive(info.name, f"CRIU images are regular files and directories, this is a {info.kind}",
                            label)
    target = safe_member_path(dest, rel, create_parents=True, archive=label)
    if info.kind == "dir":
        if not _lstat_is(target, stat.S_ISDIR):
            os.mkdir(target, 0o700)
        return
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, _PRIVATE)
    raw.seek(info.offset)
    with os.fdopen(fd, "wb") as out:
        copy_exactly(raw, out, info.size, f"{label} member {info.name!r}")


class _Window(io.RawIOBase):
    """`size` bytes of `raw` from its current position, as a file of their own."""

    def __init__(self, raw: BinaryIO, size: int):
        self._raw = raw
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._left)
        if want == 0:
            return 0
        got = self._raw.readinto(memoryview(buffer)[:want])
        if not got:
            raise ArchiveFormatError(str(getattr(self._raw, "name", "archive")), "member data ends early "
                                     "(truncated)")
        self._left -= got
        return got


def _kind(member: tarfile.TarInfo) -> str:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "special"
