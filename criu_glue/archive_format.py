"""The checkpoint archive's members and small JSON files, as CRI-O, Podman, containerd and
checkpointctl write them; readers and writers side by side so they cannot drift apart.

A container checkpoint archive is a tar whose top level holds:
  checkpoint/       CRIU's image directory (must be a real directory entry: checkpointctl
                    refuses archives without one)
  config.dump       CheckpointConfig (JSON)
  spec.dump         the OCI runtime config at checkpoint time (JSON)
  status.dump       the CRI ContainerStatus in Go's encoding/json form (containerd writes and
                    requires it; see status_to_json)
  dump.log, stats-dump               CRIU's log and statistics
  rootfs-diff.tar, deleted.files     the container's writable-layer changes
  bind.mounts       external bind mounts (JSON list of BindMount)
  a copy of the container log under an engine-specific name
  Podman extras: network.status, devshm-checkpoint.tar, volumes/, pod.options, pod.dump

Names and JSON keys are checkpointctl's (lib/metadata.go), which all three engines import.
"""
from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import ArchiveFormatError

# ---------------------------------------------------------------- member names

CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
STATUS_DUMP = "status.dump"
DUMP_LOG = "dump.log"
STATS_DUMP = "stats-dump"
ROOTFS_DIFF_TAR = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
BIND_MOUNTS = "bind.mounts"
# The container log copy: pyshim uses containerd's name; CRI-O names the file after the
# annotation key holding the log path; Podman uses ctr.log.
CONTAINER_LOG = "container.log"
CRIO_LOG = "io.kubernetes.cri-o.LogPath"
PODMAN_LOG = "ctr.log"
LOG_MEMBERS = (CONTAINER_LOG, CRIO_LOG, PODMAN_LOG)
# Podman only.
NETWORK_STATUS = "network.status"
DEVSHM_CHECKPOINT_TAR = "devshm-checkpoint.tar"
VOLUMES_DIR = "volumes"
POD_OPTIONS = "pod.options"
POD_DUMP = "pod.dump"
ARTIFACTS_DIR = "artifacts"
# containerd's internal task status file, copied verbatim (checkpointctl reads it).
CONTAINERD_STATUS = "status"

REQUIRED_MEMBERS = (CONFIG_DUMP, SPEC_DUMP)
# Small JSON members an archive reader keeps in memory; anything bigger is not metadata.
METADATA_MEMBERS = (CONFIG_DUMP, SPEC_DUMP, STATUS_DUMP, DELETED_FILES, BIND_MOUNTS,
                    NETWORK_STATUS, POD_OPTIONS, POD_DUMP)
MAX_METADATA_BYTES = 16 << 20

_MEMBER_MODE = 0o600  # the archive holds process memory; nothing in it is for other users


# ---------------------------------------------------------------- RFC 3339 times (Go's time.Time)

# Go marshals time.Time as RFC 3339 with up to nine fraction digits, trailing zeros trimmed,
# and the zero time as "0001-01-01T00:00:00Z"; offsets other than Z occur (checkpointctl's own
# test data has +05:30).
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                      r"(?:([Zz])|([+-])(\d{2}):(\d{2}))")
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_rfc3339_ns(text: str) -> int | None:
    """Nanoseconds since the Unix epoch; None for Go's zero time. ValueError if malformed."""
    m = _RFC3339.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not an RFC 3339 time")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if m.group(8):
        offset = timedelta(0)
    else:
        sign = 1 if m.group(9) == "+" else -1
        offset = sign * timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
    when = datetime(year, month, day, hour, minute, second,
                    tzinfo=timezone(offset))  # ValueError on day 31 of February etc.
    nanos = int((m.group(7) or "").ljust(9, "0"))
    if when == datetime(1, 1, 1, tzinfo=timezone.utc) and nanos == 0:
        return None
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + nanos


def format_rfc3339_ns(ns: int | None) -> str:
    """Go's time.RFC3339Nano rendering in UTC; None renders as Go's zero time."""
    if ns is None:
        return GO_ZERO_TIME
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


# ---------------------------------------------------------------- config.dump

_CONFIG_STRING_KEYS = {  # JSON key -> attribute, in the order Go writes them
    "id": "id",
    "name": "name",
    "rootfsImage": "rootfs_image",
    "rootfsImageRef": "rootfs_image_ref",
    "rootfsImageName": "rootfs_image_name",
    "runtime": "runtime",
}
_CONFIG_OMITEMPTY = ("rootfsImage", "rootfsImageRef", "rootfsImageName", "runtime")
_CONFIG_TIME_KEYS = {
    "createdTime": "created_time_ns",
    "checkpointedTime": "checkpointed_time_ns",
    "restoredTime": "restored_time_ns",
}
_CONFIG_REQUIRED = ("id", "name")
# Podman's config.dump is its whole container configuration (libpod ContainerConfig), not
# checkpointctl's: the base image is rootfsImageName (the name as pulled, e.g. "host/repo:tag")
# plus rootfsImageID (bare hex), with no rootfsImage, rootfsImageRef or checkpointedTime.
PODMAN_IMAGE_ID_KEY = "rootfsImageID"
_IMAGE_ID = re.compile(r"(sha256:)?[0-9a-f]{64}")
_CONFIG_KNOWN = (*_CONFIG_STRING_KEYS, *_CONFIG_TIME_KEYS, "restored")


@dataclass
class CheckpointConfig:
    """config.dump. Times are nanoseconds since the epoch (CRI's unit), None for Go's zero time.

    rootfs_image is the image as the user asked for it, rootfs_image_ref the resolved image
    (ID, or NAME@DIGEST), rootfs_image_name a name of that image. Keys this class does not know
    (Podman writes its whole container config here) are kept in `extra` and written back.
    """
    id: str
    name: str
    rootfs_image: str = ""
    rootfs_image_ref: str = ""
    rootfs_image_name: str = ""
    runtime: str = ""
    created_time_ns: int | None = None
    checkpointed_time_ns: int | None = None
    restored_time_ns: int | None = None
    restored: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_id(self) -> str:
        """The base image's ID (its config digest) as the engine wrote it, bare hex or
        "sha256:<hex>": rootfsImageRef when it is an ID (CRI-O, containerd, pyshim), else
        Podman's rootfsImageID; "" when the archive records no ID."""
        if _IMAGE_ID.fullmatch(self.rootfs_image_ref):
            return self.rootfs_image_ref
        podman = self.extra.get(PODMAN_IMAGE_ID_KEY)
        return podman if isinstance(podman, str) and _IMAGE_ID.fullmatch(podman) else ""

    def to_json(self) -> bytes:
        clash = sorted(set(self.extra) & set(_CONFIG_KNOWN))
        if clash:
            raise ValueError(f"CheckpointConfig.extra repeats known keys {clash}")
        doc: dict[str, Any] = {}
        for key, attr in _CONFIG_STRING_KEYS.items():
            value = getattr(self, attr)
            if value or key not in _CONFIG_OMITEMPTY:
                doc[key] = value
        for key, attr in _CONFIG_TIME_KEYS.items():
            doc[key] = format_rfc3339_ns(getattr(self, attr))
        doc["restored"] = self.restored
        doc.update(self.extra)
        return _dump_json(doc)

    @classmethod
    def from_json(cls, data: bytes | str, archive: str = "") -> CheckpointConfig:
        doc = _load_json(data, CONFIG_DUMP, archive)
        if not isinstance(doc, dict):
            raise _bad(archive, CONFIG_DUMP, f"must be a JSON object, not {_json_type(doc)}")
        for key in _CONFIG_REQUIRED:
            if key not in doc:
                raise _bad(archive, CONFIG_DUMP, f"key {key!r} is missing")
        values: dict[str, Any] = {}
        for key, attr in _CONFIG_STRING_KEYS.items():
            if key in doc:
                values[attr] = _expect(doc[key], str, archive, key)
        for key, attr in _CONFIG_TIME_KEYS.items():
            if key in doc:
                text = _expect(doc[key], str, archive, key)
                try:
                    values[attr] = parse_rfc3339_ns(text)
                except ValueError as exc:
                    raise _bad(archive, CONFIG_DUMP, f"key {key!r}: {exc}") from None
        if "restored" in doc:
            values["restored"] = _expect(doc["restored"], bool, archive, "restored")
        extra = {k: v for k, v in doc.items() if k not in _CONFIG_KNOWN}
        return cls(**values, extra=extra)


# ---------------------------------------------------------------- bind.mounts

BIND_MOUNT_FILE_TYPES = ("directory", "file")


@dataclass(frozen=True)
class BindMount:
    """One external bind mount, recorded so a restore can recreate a missing source with the
    right type (CRIU cannot bind a directory onto a file). Unknown keys are not kept."""
    source: str
    destination: str
    file_type: str    # "directory" or "file"
    permissions: int  # mode bits of the source (Go's FileMode.Perm())

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination,
                "file_type": self.file_type, "permissions": self.permissions}

    @classmethod
    def from_dict(cls, doc: Any, index: int, archive: str = "") -> BindMount:
        where = f"entry {index}"
        if not isinstance(doc, dict):
            raise _bad(archive, BIND_MOUNTS,
                       f"{where} must be a JSON object, not {_json_type(doc)}")
        values = {}
        for key in ("source", "destination", "file_type"):
            if key not in doc:
                raise _bad(archive, BIND_MOUNTS, f"{where}: key {key!r} is missing")
            values[key] = _expect(doc[key], str, archive, f"{where}.{key}", BIND_MOUNTS)
        if values["file_type"] not in BIND_MOUNT_FILE_TYPES:
            raise _bad(archive, BIND_MOUNTS, f"{where}: key 'file_type' must be one of "
                       f"{BIND_MOUNT_FILE_TYPES}, not {values['file_type']!r}")
        if not values["destination"].startswith("/"):
            raise _bad(archive, BIND_MOUNTS, f"{where}: key 'destination' must be an absolute "
                       f"path, not {values['destination']!r}")
        permissions = _expect(doc.get("permissions", 0), int, archive, f"{where}.permissions",
                              BIND_MOUNTS)
        if not 0 <= permissions <= 0o7777:
            raise _bad(archive, BIND_MOUNTS, f"{where}: key 'permissions' {permissions} is not "
                       "a file mode")
        return cls(permissions=permissions, **values)


def bind_mounts_to_json(mounts: Iterable[BindMount]) -> bytes:
    return _dump_json([m.to_dict() for m in mounts])


def bind_mounts_from_json(data: bytes | str, archive: str = "") -> list[BindMount]:
    doc = _load_json(data, BIND_MOUNTS, archive)
    if doc is None:  # Go marshals a nil slice as null
        return []
    if not isinstance(doc, list):
        raise _bad(archive, BIND_MOUNTS, f"must be a JSON array, not {_json_type(doc)}")
    return [BindMount.from_dict(entry, i, archive) for i, entry in enumerate(doc)]


# ---------------------------------------------------------------- deleted.files

def deleted_files_to_json(paths: Iterable[str]) -> bytes:
    """Container paths, absolute ("/etc/motd") as CRI-O and Podman write them."""
    return _dump_json(list(paths))


def deleted_files_from_json(data: bytes | str, archive: str = "") -> list[str]:
    """The paths as written; apply_rootfs_diff decides whether each is safe to delete."""
    doc = _load_json(data, DELETED_FILES, archive)
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise _bad(archive, DELETED_FILES, f"must be a JSON array, not {_json_type(doc)}")
    for i, path in enumerate(doc):
        if not isinstance(path, str) or not path or "\0" in path:
            raise _bad(archive, DELETED_FILES, f"entry {i} must be a non-empty path string, "
                       f"not {path!r}")
    return doc


# ---------------------------------------------------------------- spec.dump

# The parts of spec.dump that restores (pyshim's, CRI-O's, containerd's, Podman's) and
# checkpointctl read, with the types the OCI runtime spec gives them. Go's json.Unmarshal
# refuses a spec.dump where they have another type; so does open_archive, so that no reader
# meets a string where it expects an object. "[]" marks "each element of a list", "{}" "each
# value of an object". Fields not listed may hold anything.
_SPEC_SHAPE: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("ociVersion", str),
    ("process", dict),
    ("process.args", list), ("process.args[]", str),
    ("process.env", list), ("process.env[]", str),
    ("process.cwd", str),
    ("process.user", dict), ("process.user.uid", int), ("process.user.gid", int),
    ("process.user.additionalGids", list), ("process.user.additionalGids[]", int),
    ("process.capabilities", dict),
    *((f"process.capabilities.{s}", list) for s in
      ("bounding", "effective", "inheritable", "permitted", "ambient")),
    *((f"process.capabilities.{s}[]", str) for s in
      ("bounding", "effective", "inheritable", "permitted", "ambient")),
    ("root", dict), ("root.path", str), ("root.readonly", bool),
    ("hostname", str),
    ("mounts", list), ("mounts[]", dict),
    ("mounts[].destination", str), ("mounts[].source", str), ("mounts[].type", str),
    ("mounts[].options", list), ("mounts[].options[]", str),
    ("annotations", dict), ("annotations{}", str),
    ("linux", dict),
    ("linux.namespaces", list), ("linux.namespaces[]", dict),
    ("linux.namespaces[].type", str), ("linux.namespaces[].path", str),
    ("linux.maskedPaths", list), ("linux.maskedPaths[]", str),
    ("linux.readonlyPaths", list), ("linux.readonlyPaths[]", str),
    ("linux.sysctl", dict), ("linux.sysctl{}", str),
    ("linux.cgroupsPath", str),
)


def check_spec_shape(spec: dict[str, Any], archive: str = "") -> dict[str, Any]:
    """Refuse (ArchiveFormatError naming the field) a spec.dump whose read fields have the
    wrong JSON type; null counts as absent, as in Go."""
    for path, kind in _SPEC_SHAPE:
        for where, value in _values_at(spec, path):
            if value is None:
                continue
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                names = kind if isinstance(kind, tuple) else (kind,)
                expected = " or ".join(_json_name_of(k) for k in names)
                raise _bad(archive, SPEC_DUMP, f"{where} must be {expected}, not "
                           f"{_json_type(value)}")
    return spec


def _values_at(doc: Any, path: str) -> Iterable[tuple[str, Any]]:
    """(concrete location, value) of every value `path` names in `doc`; parents of the wrong
    type were refused earlier in _SPEC_SHAPE's order and are skipped here."""
    found: list[tuple[str, Any]] = [("", doc)]
    for step in path.split("."):
        name, each = step.rstrip("[]{}"), step[len(step.rstrip("[]{}")):]
        deeper: list[tuple[str, Any]] = []
        for where, value in found:
            if not isinstance(value, dict) or value.get(name) is None:
                continue
            child, here = value[name], f"{where}.{name}" if where else name
            if each == "[]" and isinstance(child, list):
                deeper += [(f"{here}[{i}]", v) for i, v in enumerate(child)]
            elif each == "{}" and isinstance(child, dict):
                deeper += [(f"{here}[{k!r}]", v) for k, v in child.items()]
            elif not each:
                deeper.append((here, child))
        found = deeper
    return found


def _json_name_of(kind: type) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "an integer",
            bool: "a boolean"}.get(kind, kind.__name__)


# ---------------------------------------------------------------- status.dump

# containerd writes status.dump with Go's encoding/json applied to the CRI ContainerStatus struct
# that protoc-gen-gogo generated (json.Marshal(status), and json.Unmarshal at restore):
# - keys are the struct's json tags, which are the .proto field names ("created_at",
#   "image_ref", "container_path", "uidMappings"), in declaration order;
# - `omitempty` everywhere: zero numbers, "", false, nil messages and empty lists/maps are left
#   out, a present but empty message is {};
# - enums (state, propagation) are plain numbers: gogo enums have no MarshalJSON. A string
#   there is what containerd 2.x refused in older pyshim archives ("cannot unmarshal string
#   into Go struct field ContainerStatus.state");
# - int64 and uint64 are JSON numbers, not protobuf-JSON's strings;
# - map keys are sorted, bytes are base64.
# Older pyshim archives hold protobuf-JSON (camelCase keys, enum names, int64 as strings);
# status_from_json reads both, since protobuf's parser takes proto field names and enum numbers.

_MessageT = TypeVar("_MessageT", bound=Message)


def status_to_json(status: Message) -> bytes:
    """status.dump as containerd writes and reads it (see above)."""
    return _dump_json(go_json_of(status))


def status_from_json(data: bytes | str, into: _MessageT, archive: str = "") -> _MessageT:
    """Fill `into` (an empty CRI ContainerStatus) from status.dump in either form; keys the
    message does not know are ignored, as Go's decoder ignores them."""
    doc = _load_json(data, STATUS_DUMP, archive)
    if not isinstance(doc, dict):
        raise _bad(archive, STATUS_DUMP, f"must be a JSON object, not {_json_type(doc)}")
    try:
        return json_format.ParseDict(doc, into, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise _bad(archive, STATUS_DUMP, f"is not a CRI ContainerStatus: {exc}") from None


def go_json_of(message: Message) -> dict[str, Any]:
    """A protobuf message as Go's encoding/json renders the gogo-generated struct."""
    doc: dict[str, Any] = {}
    for field_desc in message.DESCRIPTOR.fields:
        if not _go_present(message, field_desc):
            continue
        value = getattr(message, field_desc.name)
        if _is_map(field_desc):
            value_desc = field_desc.message_type.fields_by_name["value"]
            doc[field_desc.name] = {str(k): _go_scalar_or_message(value_desc, value[k])
                                    for k in sorted(value)}
        elif field_desc.is_repeated:
            doc[field_desc.name] = [_go_scalar_or_message(field_desc, v) for v in value]
        else:
            doc[field_desc.name] = _go_scalar_or_message(field_desc, value)
    return doc


def _go_present(message: Message, field_desc: FieldDescriptor) -> bool:
    if field_desc.is_repeated:  # lists and maps
        return len(getattr(message, field_desc.name)) > 0
    if field_desc.message_type is not None or field_desc.has_presence:
        return message.HasField(field_desc.name)  # a pointer in Go: nil or not
    return getattr(message, field_desc.name) != field_desc.default_value


def _is_map(field_desc: FieldDescriptor) -> bool:
    return (field_desc.message_type is not None
            and field_desc.message_type.GetOptions().map_entry)


def _go_scalar_or_message(field_desc: FieldDescriptor, value: Any) -> Any:
    if field_desc.type == FieldDescriptor.TYPE_MESSAGE:
        return go_json_of(value)
    if field_desc.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value  # numbers (enums included) stay numbers, strings and bools as they are


# ---------------------------------------------------------------- preparing a members directory

def write_member(members_dir: Path, name: str, data: bytes) -> Path:
    """Write one top-level member file (mode 0600) into the directory write_archive packs."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"{name!r} is not a top-level member name")
    path = Path(members_dir) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 _MEMBER_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), _MEMBER_MODE)  # an existing file keeps its old mode otherwise
        f.write(data)
    return path


def write_config(members_dir: Path, config: CheckpointConfig) -> Path:
    return write_member(members_dir, CONFIG_DUMP, config.to_json())


def write_spec(members_dir: Path, spec: dict[str, Any]) -> Path:
    return write_member(members_dir, SPEC_DUMP, _dump_json(spec))


def write_status(members_dir: Path, status: Message) -> Path:
    return write_member(members_dir, STATUS_DUMP, status_to_json(status))


def write_bind_mounts(members_dir: Path, mounts: Iterable[BindMount]) -> Path:
    return write_member(members_dir, BIND_MOUNTS, bind_mounts_to_json(mounts))


def write_deleted_files(members_dir: Path, paths: Iterable[str]) -> Path:
    return write_member(members_dir, DELETED_FILES, deleted_files_to_json(paths))


def json_object_from(data: bytes | str, member: str, archive: str = "") -> dict[str, Any]:
    """spec.dump, status.dump and the like: any JSON object."""
    doc = _load_json(data, member, archive)
    if not isinstance(doc, dict):
        raise _bad(archive, member, f"must be a JSON object, not {_json_type(doc)}")
    return doc


# ---------------------------------------------------------------- helpers

def _dump_json(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8")


def _load_json(data: bytes | str, member: str, archive: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(archive, member, f"is not valid JSON: {exc}") from None
    except RecursionError:  # thousands of nested arrays or objects: nothing an engine writes
        raise _bad(archive, member, "nests JSON arrays or objects too deeply") from None


def _expect(value: Any, kind: type, archive: str, key: str, member: str = CONFIG_DUMP) -> Any:
    # bool is an int in Python; JSON true must not pass as permissions 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(archive, member, f"key {key!r} must be a {_json_name(kind)}, "
                   f"not {_json_type(value)} {value!r}")
    return value


def _bad(archive: str, member: str, detail: str) -> ArchiveFormatError:
    return ArchiveFormatError(archive or "(in memory)", f"{member}: {detail}")


def _json_name(kind: type) -> str:
    return {str: "string", bool: "boolean", int: "integer"}.get(kind, kind.__name__)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
