"""Pod sandboxes without a pause container: a pinned network namespace networked by CNI, pinned IPC
and UTS namespaces, an infra process only when the pod shares one PID namespace, the pod's
resolv.conf/hosts/hostname files, and a cgroup parent. Every step has its undo, so a failed
RunPodSandbox leaves nothing behind and RemovePodSandbox leaves nothing at all.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import secrets
import socket
import threading
import time
from pathlib import Path

from cri_api import api_pb2 as cri
from oci.tree_removal import remove_tree
from pyshim.annotations import POD_IP_ANNOTATION, POD_MAC_ANNOTATION
from pyshim.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from pyshim.internal import cgroups, netns, pod_files, pod_namespaces, request_paths
from pyshim.internal.cni import CNINetwork, NetworkAttachment, PortMapping
from pyshim.internal.state import RecordStore, SandboxRecord, SandboxState, decode_config, encode_config
from pyshim.internal.sysctls import validate_sysctls

log = logging.getLogger(__name__)

NODE = cri.NamespaceMode.NODE
POD = cri.NamespaceMode.POD
CONTAINER = cri.NamespaceMode.CONTAINER
TARGET = cri.NamespaceMode.TARGET


_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def sandbox_name_key(config) -> str:
    m = config.metadata
    return f"k8s_POD_{m.name}_{m.namespace}_{m.uid}_{m.attempt}"


def requested_address(config) -> tuple[str, str]:
    """The fixed IP and MAC a pod asks for by annotation ("" = any): pyshim's host restart gives
    restored pods their old addresses this way, so that their TCP peers never notice the move."""
    ip = config.annotations.get(POD_IP_ANNOTATION, "")
    mac = config.annotations.get(POD_MAC_ANNOTATION, "")
    if ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidArgument(f"annotation {POD_IP_ANNOTATION}={ip!r} is not an IP address") from None
    if mac and not _MAC_RE.fullmatch(mac):
        raise InvalidArgument(f"annotation {POD_MAC_ANNOTATION}={mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return ip, mac.lower()


def pod_hostname(config) -> str:
    """The hostname a pod's containers see; "" for a host-network pod that names none.

    An explicit hostname is the pod's (validated when its UTS namespace is made). With none,
    containerd uses the node's hostname and CRI-O the first 12 characters of the sandbox ID; pyshim
    follows containerd: critest and direct CRI clients send no hostname (kubelet always does),
    pod names can be longer than a hostname may be, and the node's name is one a Kubernetes node
    already has as a valid DNS name. A fresh UTS namespace under runc with no hostname set keeps the
    node's name, so the pod's uname, /etc/hostname and $HOSTNAME all say the node's name, as with
    containerd. Host-network pods share the node's UTS namespace and keep the image's files.
    """
    if config.hostname or _namespace_options(config).network == NODE:
        return config.hostname
    return socket.gethostname()


def _namespace_options(config):
    return config.linux.security_context.namespace_options


class SandboxManager:
    def __init__(self, root: Path, state_dir: Path, network: CNINetwork, netns_prefix: str, cgroup_parent: str):
        self._dir = Path(root) / "sandboxes"
        self._pin_root = Path(state_dir) / "sandboxes"
        self._records = RecordStore(Path(root) / "state" / "sandboxes", SandboxRecord)
        self._network = network
        self._netns_prefix = netns_prefix
        self._cgroup_parent = cgroup_parent
        self._names: dict[str, str] = {}
        self._lock = threading.RLock()
        for d in (self._dir, self._pin_root):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load(self) -> None:
        self._records.load()
        for record in self._records.all():
            self._names[record.name] = record.id
            if record.state == SandboxState.READY and record.netns_name and \
                    not netns.netns_path(record.netns_name).exists():
                log.warning("pod network namespace vanished; pod marked NOTREADY", extra={"sandbox": record.id})
                record.state = SandboxState.NOTREADY
                self._records.save(record)

    # ---- lookups -----------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord:
        record = self._records.resolve(sandbox_id)
        if record is None:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return record

    def find(self, sandbox_id: str) -> SandboxRecord | None:
        return self._records.resolve(sandbox_id)

    def all(self) -> list[SandboxRecord]:
        return self._records.all()

    def config_of(self, record: SandboxRecord):
        return decode_config(record, cri.PodSandboxConfig)

    def network_ready(self) -> tuple[bool, str]:
        return self._network.ready()

    # ---- run ---------------------------------------------------------------------------------

    def run(self, config, runtime_handler: str = "") -> SandboxRecord:
        self._validate(config)
        key = sandbox_name_key(config)
        sandbox_id = secrets.token_hex(32)
        with self._lock:
            if key in self._names:
                raise AlreadyExists(f"pod sandbox name {key!r} is already in use by {self._names[key]}")
            self._names[key] = sandbox_id
        try:
            return self._run_reserved(sandbox_id, key, config, runtime_handler)
        except BaseException:
            with self._lock:
                self._names.pop(key, None)
            raise

    @staticmethod
    def _validate(config) -> None:
        m = config.metadata
        if not m.name:
            raise InvalidArgument("pod sandbox metadata.name is empty")
        if not m.namespace:
            raise InvalidArgument(f"pod sandbox {m.name!r}: metadata.namespace is empty")
        ns = _namespace_options(config)
        validate_sysctls(dict(config.linux.sysctls), host_network=ns.network == NODE, host_ipc=ns.ipc == NODE)
        for pm in config.port_mappings:
            if not 0 < pm.container_port < 65536 or not 0 <= pm.host_port < 65536:
                raise InvalidArgument(f"port mapping {pm.host_port}->{pm.container_port} is out of range")
        requested_address(config)
        request_paths.check_log_directory(config.log_directory)
        request_paths.check_cgroup_parent(config.linux.cgroup_parent)

    def _run_reserved(self, sandbox_id: str, key: str, config, runtime_handler: str) -> SandboxRecord:
        ns = _namespace_options(config)
        hostname = pod_hostname(config)
        record = SandboxRecord(
            id=sandbox_id, name=key, namespace=config.metadata.namespace, uid=config.metadata.uid,
            attempt=config.metadata.attempt, config_b64=encode_config(config), created_at=time.time_ns(),
            runtime_handler=runtime_handler, hostname=hostname,
            cgroup_parent=config.linux.cgroup_parent or f"{self._cgroup_parent.rstrip('/')}/{sandbox_id}",
            files_dir=str(self._dir / sandbox_id), pin_dir=str(self._pin_root / sandbox_id),
        )
        with contextlib.ExitStack() as undo:
            files_dir, pin_dir = Path(record.files_dir), Path(record.pin_dir)
            files_dir.mkdir(mode=0o755)
            undo.callback(remove_tree, files_dir, ignore_errors=True)
            pin_dir.mkdir(mode=0o700)
            undo.callback(remove_tree, pin_dir, ignore_errors=True)

            if ns.network != NODE:
                self._set_up_network(record, config, undo)
            self._write_pod_files(record, config)
            kinds = tuple(k for k, mode in (("ipc", ns.ipc), ("uts", ns.network)) if mode != NODE)
            if kinds:
                pod_namespaces.pin_namespaces(pin_dir, hostname, kinds=kinds)
                undo.callback(pod_namespaces.unpin_namespaces, pin_dir)
            if ns.pid == POD:
                pod_namespaces.start_pid_infra(pin_dir)
                record.pid_infra = True
                undo.callback(pod_namespaces.stop_pid_infra, pin_dir)
            undo.callback(cgroups.remove, record.cgroup_parent)
            self._records.save(record)
            undo.pop_all()
        log.info("pod sandbox ready", extra={"sandbox": sandbox_id, "pod": config.metadata.name,
                                             "namespace": config.metadata.namespace, "ip": record.ip})
        return record

    def _set_up_network(self, record: SandboxRecord, config, undo: contextlib.ExitStack) -> None:
        record.netns_name = f"{self._netns_prefix}{record.id[:16]}"
        path = netns.create_netns(record.netns_name)
        undo.callback(netns.remove_netns, record.netns_name)
        m = config.metadata
        ip, mac = requested_address(config)
        attachment = self._network.attach(record.id, path, m.name, m.namespace, m.uid, self._port_mappings(config),
                                          ip=ip, mac=mac)
        undo.callback(self._network.detach, record.id, path, self._port_mappings(config))
        record.ip = attachment.ip
        record.network = attachment.to_dict()

    @staticmethod
    def _port_mappings(config) -> list[PortMapping]:
        protocols = {cri.Protocol.TCP: "tcp", cri.Protocol.UDP: "udp", cri.Protocol.SCTP: "sctp"}
        return [PortMapping(host_port=pm.host_port, container_port=pm.container_port,
                            protocol=protocols.get(pm.protocol, "tcp"), host_ip=pm.host_ip)
                for pm in config.port_mappings if pm.host_port]

    @staticmethod
    def _write_pod_files(record: SandboxRecord, config) -> None:
        files_dir = Path(record.files_dir)
        dns = config.dns_config
        pod_files.write_resolv_conf(files_dir / "resolv.conf", list(dns.servers), list(dns.searches),
                                    list(dns.options))
        if record.hostname:
            pod_files.write_hosts(files_dir / "hosts", record.hostname, record.ip)
            pod_files.write_hostname(files_dir / "hostname", record.hostname)

    # ---- what containers of the pod join -----------------------------------------------------

    def container_namespaces(self, record: SandboxRecord, container_ns, target_pid_path: str = "") -> dict[str, str | None]:
        """Namespace paths for a container of this pod (see oci.runtime_spec: None = new, absent = host)."""
        if record.state != SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {record.id} is not ready (stopped?): cannot add containers")
        pod_ns = _namespace_options(self.config_of(record))
        pins = Path(record.pin_dir)
        namespaces: dict[str, str | None] = {"mount": None}
        if pod_ns.network != NODE:
            namespaces["network"] = str(netns.netns_path(record.netns_name))
            namespaces["uts"] = str(pins / "uts")
        if pod_ns.ipc != NODE:
            namespaces["ipc"] = str(pins / "ipc")
        # kubelet sets the container's own PID mode (POD when the pod shares one process namespace).
        pid_mode = container_ns.pid
        if pid_mode == POD:
            if not record.pid_infra:
                raise FailedPrecondition(f"pod sandbox {record.id} was not created with a shared PID namespace")
            namespaces["pid"] = str(pod_namespaces.pid_infra_ns_path(pins))
        elif pid_mode == TARGET:
            if not target_pid_path:
                raise InvalidArgument("PID namespace mode TARGET needs target_id")
            namespaces["pid"] = target_pid_path
        elif pid_mode == CONTAINER:
            namespaces["pid"] = None
        return namespaces

    @staticmethod
    def container_files(record: SandboxRecord) -> dict[str, str]:
        files_dir = Path(record.files_dir)
        wanted = {"/etc/resolv.conf": files_dir / "resolv.conf", "/etc/hosts": files_dir / "hosts",
                  "/etc/hostname": files_dir / "hostname"}
        return {dest: str(src) for dest, src in wanted.items() if src.exists()}

    # ---- stop / remove -----------------------------------------------------------------------

    def stop(self, sandbox_id: str) -> None:
        """Tear down the pod's network and namespaces. The caller has stopped its containers. Idempotent."""
        record = self._records.resolve(sandbox_id)
        if record is None:
            return
        with self._lock:
            config = self.config_of(record)
            if record.netns_name:
                path = netns.netns_path(record.netns_name)
                self._network.detach(record.id, path, self._port_mappings(config))
                netns.remove_netns(record.netns_name)
            pins = Path(record.pin_dir)
            if record.pid_infra:
                pod_namespaces.stop_pid_infra(pins)
            pod_namespaces.unpin_namespaces(pins)
            if record.state != SandboxState.NOTREADY:
                record.state = SandboxState.NOTREADY
                self._records.save(record)

    def remove(self, sandbox_id: str) -> None:
        """Remove what is left after stop. The caller has removed the pod's containers. Idempotent."""
        record = self._records.resolve(sandbox_id)
        if record is None:
            return
        self.stop(record.id)
        cgroups.remove(record.cgroup_parent)
        remove_tree(record.files_dir, ignore_errors=True)
        remove_tree(record.pin_dir, ignore_errors=True)
        with self._lock:
            self._records.delete(record.id)
            self._names.pop(record.name, None)
        log.info("pod sandbox removed", extra={"sandbox": record.id})
