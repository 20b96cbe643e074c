"""Validate an OCI runtime config (config.json) against the runtime-spec JSON schema.

The schemas are vendored in ``oci/schema/`` (provenance and the exact upstream
commits are in ``oci/schema/README.md``: opencontainers/runtime-spec master
revisions from the v1.0.1 -> v1.0.2 window, e.g. config-schema.json at
deb4d954eafc4fc65f04c00a08e08c3e69df32d0). They are loaded once into a
``referencing`` registry so the cross-file ``$ref``s ("defs.json#/...")
resolve offline: nothing here ever touches the network.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterable

import jsonschema
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.jsonschema import DRAFT4

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
ROOT_SCHEMA = "config-schema.json"
# The upstream files carry no "id"; relative refs such as "defs.json#/x" are
# resolved against this base, under which every vendored file is registered.
SCHEMA_BASE_URI = "https://opencontainers.org/schema/"


class InvalidSpec(ValueError):
    """A runtime config does not conform to the runtime-spec schema.

    ``problems`` lists every violation as "<json path>: <message>", the most
    relevant one first; ``str()`` names the first and how many more there are.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"invalid OCI runtime config: {problems[0]}{more}")


def json_path(parts: Iterable[Any]) -> str:
    """Render a jsonschema error location as "$.mounts[2].destination"."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


@functools.lru_cache(maxsize=1)
def schema_registry() -> Registry:
    """Every vendored schema file, registered under SCHEMA_BASE_URI + file name."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        contents = json.loads(path.read_text(encoding="utf-8"))
        # Only config-schema.json declares "$schema"; the others are fragments
        # of the same draft-04 document set.
        resources.append((SCHEMA_BASE_URI + path.name, DRAFT4.create_resource(contents)))
    if not resources:
        raise RuntimeError(f"no runtime-spec schemas found in {SCHEMA_DIR}")
    return Registry().with_resources(resources)


@functools.lru_cache(maxsize=1)
def config_validator() -> jsonschema.Draft4Validator:
    # A one-line root that points at the registered config schema gives the
    # validator the right base URI for every relative $ref below it.
    root = {"$ref": SCHEMA_BASE_URI + ROOT_SCHEMA}
    return jsonschema.Draft4Validator(root, registry=schema_registry())


def describe(error: ValidationError) -> str:
    return f"{json_path(error.absolute_path)}: {error.message}"


def validate_spec(spec: dict) -> None:
    """Raise InvalidSpec unless ``spec`` conforms to the vendored runtime-spec schema."""
    if not isinstance(spec, dict):
        raise InvalidSpec([f"$: expected a JSON object, got {type(spec).__name__}"])
    errors = list(config_validator().iter_errors(spec))
    if not errors:
        return
    first = best_match(errors)
    rest = [e for e in errors if e is not first]
    raise InvalidSpec([describe(first)] + [describe(e) for e in rest])
