"""A process the kernel cannot exec is refused at CreateContainer, not after 21 s at start."""
import os

import pytest

from cri_api import api_pb2 as cri
from oci.image_config import ImageConfig
from oci.runtime_spec import MAX_ARG_STRLEN, MAX_EXEC_STRINGS, SpecInputError, validate_container_config


def config(command=(), args=(), envs=()):
    return cri.ContainerConfig(metadata=cri.ContainerMetadata(name="c"), command=list(command), args=list(args),
                               envs=[cri.KeyValue(key=k, value=v) for k, v in envs])


def test_ordinary_requests_pass():
    validate_container_config(config(["sh", "-c", "x" * 1000], envs=[(f"V{i}", "y" * 20) for i in range(500)]))
    validate_container_config(config(), ImageConfig(entrypoint=["/e"], cmd=["serve"], env=["PATH=/bin"]))


def test_too_many_environment_variables():
    with pytest.raises(SpecInputError, match=f"limit of {MAX_EXEC_STRINGS}"):
        validate_container_config(config(["true"], envs=[(f"V{i}", "") for i in range(MAX_EXEC_STRINGS)]))


def test_one_string_longer_than_max_arg_strlen():
    validate_container_config(config(["echo", "x" * (MAX_ARG_STRLEN - 1)]))
    with pytest.raises(SpecInputError, match="MAX_ARG_STRLEN"):
        validate_container_config(config(["echo", "x" * MAX_ARG_STRLEN]))
    with pytest.raises(SpecInputError, match="environment variable 0"):
        validate_container_config(config(["true"], envs=[("BIG", "x" * MAX_ARG_STRLEN)]))


def test_total_size_beyond_arg_max_counts_the_image_env_and_entrypoint():
    arg_max = os.sysconf("SC_ARG_MAX")
    chunk = "x" * (MAX_ARG_STRLEN - 100)
    n = arg_max // len(chunk)
    # The request alone fits; with the image's Env and Entrypoint it does not.
    request = config(args=[chunk] * (n // 2))
    validate_container_config(request)
    image = ImageConfig(entrypoint=["/e"] + [chunk] * (n // 2), env=[f"E{i}={chunk}" for i in range(3)])
    with pytest.raises(SpecInputError, match="ARG_MAX"):
        validate_container_config(request, image)
