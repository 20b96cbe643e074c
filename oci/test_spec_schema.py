"""Tests for oci.spec_schema: the vendored runtime-spec schema and its validator."""
from __future__ import annotations

import copy
import json

import pytest

from oci.spec_schema import SCHEMA_BASE_URI, SCHEMA_DIR, InvalidSpec, schema_registry, validate_spec


def minimal_linux_spec() -> dict:
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "/run/rootfs", "readonly": False},
        "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}],
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }


def all_refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from all_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_refs(item)


def test_every_cross_file_ref_resolves_offline():
    registry = schema_registry()
    files = sorted(SCHEMA_DIR.glob("*.json"))
    assert {p.name for p in files} >= {"config-schema.json", "defs.json", "config-linux.json", "defs-linux.json"}
    checked = 0
    for path in files:
        base = SCHEMA_BASE_URI + path.name
        resolver = registry.resolver(base_uri=base)
        for ref in all_refs(json.loads(path.read_text())):
            resolver.lookup(ref)  # raises referencing.exceptions.Unresolvable
            checked += 1
    assert checked > 50


def test_minimal_spec_is_valid():
    validate_spec(minimal_linux_spec())


def test_mount_without_destination_names_its_path():
    spec = minimal_linux_spec()
    spec["mounts"].append({"source": "/tmp", "type": "bind", "options": ["rbind"]})
    with pytest.raises(InvalidSpec) as err:
        validate_spec(spec)
    assert "$.mounts[1]" in str(err.value)
    assert "'destination' is a required property" in str(err.value)


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda s: s.__setitem__("ociVersion", 102), "$.ociVersion", "is not of type 'string'"),
        (lambda s: s["process"].__setitem__("args", "/bin/true"), "$.process.args", "is not of type 'array'"),
        (lambda s: s["process"].pop("cwd"), "$.process", "'cwd' is a required property"),
        (lambda s: s["process"]["user"].__setitem__("uid", -1), "$.process.user.uid", "less than the minimum"),
        (lambda s: s["linux"]["namespaces"].append({"type": "time"}), "$.linux.namespaces[2]", ""),
        (lambda s: s["linux"]["resources"]["devices"][0].pop("allow"), "$.linux.resources.devices[0]", "'allow'"),
        (lambda s: s["process"].__setitem__("rlimits", [{"type": "NOFILE", "soft": 1, "hard": 1}]),
         "$.process.rlimits[0].type", "does not match"),
        (lambda s: s["linux"].__setitem__("devices", [{"path": "/dev/fuse", "type": "x"}]),
         "$.linux.devices[0].type", "does not match"),
    ],
)
def test_broken_specs_are_rejected_with_their_json_path(mutate, path, words):
    spec = copy.deepcopy(minimal_linux_spec())
    mutate(spec)
    with pytest.raises(InvalidSpec) as err:
        validate_spec(spec)
    assert str(err.value).startswith(f"invalid OCI runtime config: {path}")
    assert words in str(err.value)


def test_every_problem_is_listed():
    spec = minimal_linux_spec()
    spec["ociVersion"] = 1
    spec["mounts"][0].pop("destination")
    with pytest.raises(InvalidSpec) as err:
        validate_spec(spec)
    assert len(err.value.problems) == 2
    assert "more problem" in str(err.value)


def test_non_object_is_rejected():
    with pytest.raises(InvalidSpec, match=r"\$: expected a JSON object"):
        validate_spec([])  # type: ignore[arg-type]


def test_schema_provenance_is_recorded():
    readme = (SCHEMA_DIR / "README.md").read_text()
    assert "opencontainers/runtime-spec" in readme
    for path in SCHEMA_DIR.glob("*.json"):
        assert path.name in readme, f"{path.name} has no recorded upstream commit"
