"""Kubernetes CRI v1 API (package ``runtime.v1``) for pyshim.

``api.proto`` is a vendored copy of the upstream CRI definition (see its
header for the source commit). The Python modules are generated from it at
build time and are not committed:

    from cri_api import api_pb2 as cri, api_pb2_grpc

``api_pb2`` holds the messages and enums; ``api_pb2_grpc`` the
RuntimeService/ImageService stubs, servicer base classes and
``add_*Servicer_to_server`` helpers. ``pip install .`` or ``pip install -e .``
generates them (setup.py), as does ``python -m cri_api._build``.

Importing this package is cheap: the generated modules are loaded only when
asked for.
"""

import importlib

_GENERATED = ("api_pb2", "api_pb2_grpc")

__all__ = list(_GENERATED)


def __getattr__(name):
    # Lazy access to the generated modules (``cri_api.api_pb2``), with a
    # useful message when they were never generated.
    if name in _GENERATED:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise ImportError(
                f"{__name__}.{name} has not been generated from api.proto; "
                "run `pip install -e .` or `python -m cri_api._build`",
                name=exc.name,
            ) from exc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
