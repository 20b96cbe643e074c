"""The parts of an OCI image configuration that running a container needs.

Reader for `application/vnd.oci.image.config.v1+json` (and Docker's identical v2 config).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    volumes: list[str] = field(default_factory=list)
    exposed_ports: list[str] = field(default_factory=list)
    architecture: str = ""
    os: str = ""
    diff_ids: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, raw: bytes | str | dict) -> "ImageConfig":
        doc = raw if isinstance(raw, dict) else json.loads(raw)
        cfg = doc.get("config") or {}
        rootfs = doc.get("rootfs") or {}
        return cls(
            entrypoint=list(cfg.get("Entrypoint") or []),
            cmd=list(cfg.get("Cmd") or []),
            env=list(cfg.get("Env") or []),
            working_dir=cfg.get("WorkingDir") or "",
            user=cfg.get("User") or "",
            labels=dict(cfg.get("Labels") or {}),
            stop_signal=cfg.get("StopSignal") or "",
            volumes=sorted((cfg.get("Volumes") or {}).keys()),
            exposed_ports=sorted((cfg.get("ExposedPorts") or {}).keys()),
            architecture=doc.get("architecture") or "",
            os=doc.get("os") or "",
            diff_ids=list(rootfs.get("diff_ids") or []),
        )
