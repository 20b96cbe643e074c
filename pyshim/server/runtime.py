"""What every CRI handler works with: the managers, the image store and the daemon's settings."""
from __future__ import annotations

from dataclasses import dataclass

from pyshim.config import Config
from pyshim.checkpoint_restore.checkpoint import Checkpointer
from pyshim.internal.container_manager import ContainerManager
from pyshim.internal.events import EventBus
from pyshim.checkpoint_restore.restore import RestoreEngine, Restorer
from pyshim.internal.sandbox_manager import SandboxManager

RUNTIME_NAME = "pyshim"
RUNTIME_API_VERSION = "v1"


@dataclass
class Runtime:
    config: Config
    sandboxes: SandboxManager
    containers: ContainerManager
    images: object  # oci.store.ImageStore
    registry: object  # oci.registry.RegistryClient
    events: EventBus
    checkpointer: Checkpointer
    restorer: Restorer
    restores: RestoreEngine  # the restore flow (CreateContainer/StartContainer of a checkpoint)
    runc_version: str
    conmon_version: str
    log: object  # logging.Logger of the daemon
    streaming: object = None  # pyshim.streaming.server.StreamingServer, once serving
    pod_checkpointer: object = None  # pyshim.checkpoint_restore.pod_checkpoint.PodCheckpointer
    lazy_checkpoints: object = None  # pyshim.checkpoint_restore.lazy_checkpoint.LazyCheckpoints (migrate --lazy)
    intents: object = None  # pyshim.internal.intents.IntentJournal (RestorePod journals there itself)
