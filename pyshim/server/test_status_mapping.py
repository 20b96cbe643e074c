"""The one mapping from domain errors to gRPC status codes (servicer.status_of)."""
from __future__ import annotations

import grpc
import pytest

from criu_glue.errors import ArchiveFormatError, ArchiveLimitExceeded, UnsafeArchive
from oci import errors as oci_errors
from oci.runtime_spec import SpecInputError
from pyshim import errors
from pyshim.internal.cni import CNIConfigError, CNIPluginBusy, CNIPluginError
from pyshim.internal.runc import RuncError, RuncTimeout
from pyshim.server.servicer import status_of

C = grpc.StatusCode


@pytest.mark.parametrize("error, code", [
    (errors.NotFound("container abc not found"), C.NOT_FOUND),
    (errors.InvalidArgument("log_path must be relative"), C.INVALID_ARGUMENT),
    (errors.AlreadyExists("pod exists"), C.ALREADY_EXISTS),
    (errors.FailedPrecondition("container is stopped"), C.FAILED_PRECONDITION),
    (errors.DeadlineExceeded("timed out"), C.DEADLINE_EXCEEDED),
    (errors.Unavailable("busy"), C.UNAVAILABLE),
    (errors.Unimplemented("no"), C.UNIMPLEMENTED),
    (errors.Internal("broken"), C.INTERNAL),
    (errors.CRIError("plain"), C.INTERNAL),
    (RuncError("runc start failed: boom"), C.INTERNAL),
    (RuncTimeout("runc checkpoint did not finish"), C.INTERNAL),
    (CNIConfigError("conflist unusable"), C.FAILED_PRECONDITION),
    (CNIPluginError("CNI plugin bridge ADD failed: requested IP address 10.0.0.300 is not available",
                    plugin="bridge", command="ADD", cni_code=999), C.FAILED_PRECONDITION),
    (CNIPluginBusy("CNI plugin bridge ADD failed: try later [CNI error code 11]", cni_code=11), C.UNAVAILABLE),
    (SpecInputError("bad mount"), C.INVALID_ARGUMENT),
    (UnsafeArchive("../x", "escapes"), C.INVALID_ARGUMENT),
    (ArchiveLimitExceeded("big", "too large"), C.INVALID_ARGUMENT),
    (ArchiveFormatError("/a.tar", "no config.dump"), C.FAILED_PRECONDITION),
    (oci_errors.ImageNotFound("busybox"), C.NOT_FOUND),
    (oci_errors.InvalidReference("BAD", "uppercase"), C.INVALID_ARGUMENT),
    (oci_errors.ImageError("store broken"), C.INTERNAL),
])
def test_each_domain_error_type_maps_to_its_code_and_keeps_its_message(error, code):
    got_code, message = status_of(error)
    assert got_code == code
    assert message == getattr(error, "message", str(error))


def test_a_cni_plugins_own_error_code_is_not_taken_for_a_grpc_code():
    # The plugin's integer code (999 here) once leaked into the status and crashed the handler.
    error = CNIPluginError("CNI plugin bridge ADD for sandbox s on network 'n' failed: requested IP address "
                           "192.0.2.7 is not available in range set 10.86.0.1-10.86.0.254 [CNI error code 999]",
                           plugin="bridge", command="ADD", cni_code=999, msg="requested IP address 192.0.2.7 ...")
    code, message = status_of(error)
    assert isinstance(code, grpc.StatusCode)
    assert "requested IP address 192.0.2.7 is not available" in message


def test_a_detach_or_rollback_failure_keeps_its_class():
    busy = CNIPluginBusy("first", plugin="portmap", command="ADD", cni_code=11)
    assert status_of(busy.like("again", command="DEL")) == (C.UNAVAILABLE, "again")


def test_unexpected_exceptions_are_internal_and_named():
    assert status_of(KeyError("x")) == (C.INTERNAL, "KeyError: 'x'")


def test_domain_errors_do_not_import_grpc():
    import pathlib

    for module in ("pyshim/errors.py", "pyshim/internal/cni.py", "pyshim/internal/runc.py",
                   "criu_glue/errors.py", "oci/errors.py"):
        text = (pathlib.Path(__file__).parents[2] / module).read_text()
        assert "import grpc" not in text, module
