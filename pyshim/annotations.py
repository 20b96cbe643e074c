"""pyshim's own keys on standard CRI objects, in one place for the daemon and the tools that use them."""
from __future__ import annotations

# Pod annotations asking the network for a fixed address; the host-restart commands set them so
# that restored pods come back where their TCP peers knew them.
POD_IP_ANNOTATION = "io.pyshim.network.ip"
POD_MAC_ANNOTATION = "io.pyshim.network.mac"

# gRPC metadata on CheckpointContainer: "stop" ends the container once its archive is complete
# (a move); "leave-running" (kubelet's forensic checkpoint, the default) keeps it running.
CHECKPOINT_MODE_KEY = "pyshim-checkpoint-mode"
# "lazy" (`pyshim migrate --lazy`, checkpoint_restore/lazy_checkpoint.py): the container is frozen, everything
# but its memory is dumped and archived, and its memory is served by a CRIU page server at PAGE_SERVER_KEY's
# port; it stays frozen until the mover says how the move ended: "lazy-finish" (the target has every page:
# the container is killed, reason Checkpointed) or "lazy-resume" (the move failed: it is thawed and runs on).
LAZY_CHECKPOINT_MODES = ("lazy", "lazy-finish", "lazy-resume")
CHECKPOINT_MODES = ("leave-running", "stop") + LAZY_CHECKPOINT_MODES
# gRPC metadata with mode "lazy": ADDRESS:PORT where the target reaches this node's page server.
PAGE_SERVER_KEY = "pyshim-page-server"
# gRPC metadata on CheckpointContainer: "throwaway" skips the archive's fsync (a move's archive, deleted
# minutes later and worthless after a host crash); "durable" (the default) fsyncs it and its directory.
CHECKPOINT_ARCHIVE_KEY = "pyshim-checkpoint-archive"
CHECKPOINT_ARCHIVE_KINDS = ("durable", "throwaway")

# On a restoring CreateContainer: "true" restores post-copy (the process runs before its memory is
# in place; CRIU's lazy-pages daemon brings the pages), "false" eagerly; absent: the config's
# [checkpoint] lazy_restore. pyshim/checkpoint_restore/lazy_restore.py.
RESTORE_LAZY_ANNOTATION = "io.pyshim.restore.lazy"
# On a restoring CreateContainer, set by `pyshim migrate --lazy` only: ADDRESS:PORT (numeric) of the source
# node's CRIU page server; the restore is then lazy with its pages pulled from there, not from the images.
RESTORE_LAZY_PAGE_SERVER_ANNOTATION = "io.pyshim.restore.lazy-page-server"
