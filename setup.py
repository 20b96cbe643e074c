"""Build hook: generate the CRI gRPC modules from cri_api/api.proto, and CRIU's image messages
from the vendored criu_glue/criu_pb/*.proto.

All project metadata lives in pyproject.toml; this file only replaces
build_py so that both ``pip install .`` and ``pip install -e .`` run
grpcio-tools' protoc (listed in pyproject's [build-system] requires) before
the packages are collected. The generation itself is cri_api/_build.py and
criu_glue/criu_pb/_build.py, which a Makefile can also run:
``python -m cri_api._build``, ``python -m criu_glue.criu_pb._build``.
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))


GENERATORS = (("cri_api", "_build.py"), ("criu_glue", "criu_pb", "_build.py"))


def _load_generator(*parts):
    # Load the _build.py by path: the build backend does not necessarily
    # put the project root on sys.path, and importing the package itself is
    # not wanted at build time.
    path = os.path.join(HERE, *parts)
    spec = importlib.util.spec_from_file_location("_build_" + "_".join(parts[:-1]), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py(_build_py):
    """build_py that first generates cri_api/api_pb2*.py and criu_glue/criu_pb/*_pb2.py.

    The modules are generated into the source tree (what an editable install
    imports, and where build_py then finds them as ordinary package modules)
    and, for a regular build, again straight into build_lib so the wheel has
    them even if the source tree could not be written.
    """

    def run(self):
        generators = [_load_generator(*parts) for parts in GENERATORS]
        for parts, gen in zip(GENERATORS, generators):
            try:
                gen.generate(root=HERE)
            except OSError as exc:
                if self.editable_mode:
                    raise
                self.announce(f"{parts[0]}: not writing generated modules into the source tree: {exc}", level=3)
        super().run()
        if not self.editable_mode:
            for gen in generators:
                gen.generate(out_dir=self.build_lib, root=HERE)


setup(cmdclass={"build_py": build_py})
