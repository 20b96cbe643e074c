"""Generate the CRI Python modules from ``cri_api/api.proto``.

Runs grpcio-tools' bundled protoc with the repository root as the proto
path, so the proto is known as ``cri_api/api.proto`` and the generated gRPC
module imports ``from cri_api import api_pb2``. Writes, under ``out_dir``:

    cri_api/api_pb2.py       messages and enums
    cri_api/api_pb2_grpc.py  RuntimeService / ImageService stubs and servicers
    cri_api/api_pb2.pyi      type stubs

setup.py's build_py calls :func:`generate` (for ``pip install .`` and
``pip install -e .``); by hand or from a Makefile::

    python -m cri_api._build            # into the source tree
    python -m cri_api._build OUT_DIR    # into OUT_DIR/cri_api/

Only the standard library and grpcio-tools are needed, and this file is
loadable by path (setup.py does so), without importing the package.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "cri_api"
PROTO = f"{PACKAGE}/api.proto"
OUTPUTS = ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi")

# The directory that holds cri_api/, i.e. the repository root.
DEFAULT_ROOT = Path(__file__).resolve().parent.parent


def generate(out_dir: str | Path | None = None, root: str | Path | None = None) -> list[Path]:
    """Compile ``root/cri_api/api.proto`` into ``out_dir/cri_api/``.

    ``root`` defaults to the directory containing this package and
    ``out_dir`` to ``root`` (the source tree). Returns the written paths.
    Raises RuntimeError if protoc fails or an output is missing.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise RuntimeError(
            "grpcio-tools is needed to generate the CRI modules "
            "(pip install grpcio-tools)"
        ) from exc

    root = Path(root or DEFAULT_ROOT).resolve()
    out_dir = Path(out_dir or root).resolve()
    proto = root / PROTO
    if not proto.is_file():
        raise RuntimeError(f"CRI proto not found: {proto}")
    pkg_out = out_dir / PACKAGE
    pkg_out.mkdir(parents=True, exist_ok=True)

    # grpc_tools ships the well-known types (google/protobuf/*.proto) in its
    # _proto directory; api.proto imports none today, but keep it on the path.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(proto),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}: {' '.join(args)}")

    written = [pkg_out / name for name in OUTPUTS]
    missing = [str(p) for p in written if not p.is_file()]
    if missing:
        raise RuntimeError(f"grpc_tools.protoc did not write: {', '.join(missing)}")
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print("usage: python -m cri_api._build [OUT_DIR]", file=sys.stderr)
        return 2
    for path in generate(argv[0] if argv else None):
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
