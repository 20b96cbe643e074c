"""Generate the Python modules of CRIU's image messages from the vendored ``*.proto`` here.

The .proto files are CRIU's own (see VENDORED.md: source, version, how to update), imported by
each other under bare names (``import "opts.proto"``), so protoc writes top-level imports
(``import opts_pb2``); they are rewritten to package-relative ones (``from . import opts_pb2``) so
the modules live inside ``criu_glue.criu_pb`` and never clash with another ``core_pb2`` on
sys.path (pycriu's, say). Writes ``OUT_DIR/criu_glue/criu_pb/<name>_pb2.py`` for every proto.

setup.py's build_py calls :func:`generate`, as it does cri_api/_build.py; by hand::

    python -m criu_glue.criu_pb._build            # into the source tree
    python -m criu_glue.criu_pb._build OUT_DIR    # into OUT_DIR/criu_glue/criu_pb/

Only the standard library and grpcio-tools are needed, and this file is loadable by path.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path("criu_glue") / "criu_pb"
DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent
# `import core_x86_pb2 as core__x86__pb2` -> `from . import core_x86_pb2 as core__x86__pb2`
_TOP_LEVEL_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.M)


def generate(out_dir: str | Path | None = None, root: str | Path | None = None) -> list[Path]:
    """Compile every ``root/criu_glue/criu_pb/*.proto`` into ``out_dir/criu_glue/criu_pb/``.

    Returns the written paths; RuntimeError if protoc fails or writes nothing.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise RuntimeError("grpcio-tools is needed to generate the CRIU image modules "
                           "(pip install grpcio-tools)") from exc
    root = Path(root or DEFAULT_ROOT).resolve()
    source = root / PACKAGE_DIR
    protos = sorted(source.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no CRIU .proto files in {source}")
    pkg_out = Path(out_dir or root).resolve() / PACKAGE_DIR
    pkg_out.mkdir(parents=True, exist_ok=True)
    # opts.proto imports google/protobuf/descriptor.proto, which grpc_tools ships.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"--proto_path={source}", f"--proto_path={well_known}",
                f"--python_out={tmp}", *(str(p) for p in protos)]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed with exit code {rc}: {' '.join(args)}")
        written = []
        for proto in protos:
            name = proto.stem.replace("-", "_") + "_pb2.py"
            generated = Path(tmp) / name
            if not generated.is_file():
                raise RuntimeError(f"grpc_tools.protoc did not write {name}")
            text = _TOP_LEVEL_IMPORT.sub(r"from . import \1 as \2", generated.read_text())
            target = pkg_out / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print("usage: python -m criu_glue.criu_pb._build [OUT_DIR]", file=sys.stderr)
        return 2
    for path in generate(argv[0] if argv else None):
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
