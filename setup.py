"""Build hook: generate the CRI gRPC modules from cri_api/api.proto.

All project metadata lives in pyproject.toml; this file only replaces
build_py so that both ``pip install .`` and ``pip install -e .`` run
grpcio-tools' protoc (listed in pyproject's [build-system] requires) before
the packages are collected. The generation itself is cri_api/_build.py,
which a Makefile can also run: ``python -m cri_api._build``.
"""

import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_generator():
    # Load cri_api/_build.py by path: the build backend does not necessarily
    # put the project root on sys.path, and importing the package itself is
    # not wanted at build time.
    path = os.path.join(HERE, "cri_api", "_build.py")
    spec = importlib.util.spec_from_file_location("_cri_api_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class build_py(_build_py):
    """build_py that first generates cri_api/api_pb2*.py.

    The modules are generated into the source tree (what an editable install
    imports, and where build_py then finds them as ordinary package modules)
    and, for a regular build, again straight into build_lib so the wheel has
    them even if the source tree could not be written.
    """

    def run(self):
        gen = _load_generator()
        try:
            gen.generate(root=HERE)
        except OSError as exc:
            if self.editable_mode:
                raise
            self.announce(f"cri_api: not writing generated modules into the source tree: {exc}", level=3)
        super().run()
        if not self.editable_mode:
            gen.generate(out_dir=self.build_lib, root=HERE)


setup(cmdclass={"build_py": build_py})
