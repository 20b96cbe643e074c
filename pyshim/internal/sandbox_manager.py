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
from pyshim.internal import cgroups, crashpoints, netns, pod_files, pod_namespaces, request_paths, sandbox_leftovers
from pyshim.internal.cni import (CNI_IFNAME, CNINetwork, PortMapping, cache_temp_files,
                                 host_local_network_dirs)
from pyshim.internal.intents import Intent, IntentJournal, Operation
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


# The steps of RunPodSandbox, in order: each is a crash point, and those that change what recovery
# does (JOURNALED_RUN_STEPS) are announced in the intent journal before they are done.
RUN_STEPS = ("begin", "dirs", "netns", "cni_add", "pod_files", "pin_namespaces", "pid_infra", "save")
JOURNALED_RUN_STEPS = ("cni_add",)  # the others are crash points only (SandboxManager._step)


def _reached(intent: Intent, step: str) -> bool:
    return intent.step in RUN_STEPS and RUN_STEPS.index(intent.step) >= RUN_STEPS.index(step)


class SandboxManager:
    def __init__(self, root: Path, state_dir: Path, network: CNINetwork, netns_prefix: str, cgroup_parent: str,
                 intents: IntentJournal | None = None, runc=None):
        self._intents = intents if intents is not None else IntentJournal(Path(root) / "state" / "intents")
        # pyshim.internal.runc.Runc: RemovePodSandbox deletes runc containers still in the pod's cgroup.
        self._runc = runc
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

    def run(self, config, runtime_handler: str = "", sandbox_id: str = "") -> SandboxRecord:
        """`sandbox_id`: an id the caller journaled before this call (RestorePod), else a fresh one."""
        self._validate(config)
        key = sandbox_name_key(config)
        sandbox_id = sandbox_id or secrets.token_hex(32)
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
        if ns.network != NODE:
            record.netns_name = f"{self._netns_prefix}{record.id[:16]}"
        # Every name of what will be made is durable before anything is made: a kill -9 at any line
        # below leaves recovery (self.recover) what it needs to undo it all.
        intent = self._intents.begin(Operation.RUN_SANDBOX, sandbox_id, **self._run_facts(record))
        try:
            self._make_sandbox(intent, record, config, ns, hostname)
        finally:
            # Done, or undone by the undo stack: nothing is left for recovery either way.
            self._intents.finish(intent)
        log.info("pod sandbox ready", extra={"sandbox": sandbox_id, "pod": config.metadata.name,
                                             "namespace": config.metadata.namespace, "ip": record.ip})
        return record

    def _run_facts(self, record: SandboxRecord) -> dict[str, str]:
        facts = {"name": record.name, "files_dir": record.files_dir, "pin_dir": record.pin_dir,
                 "cgroup_parent": record.cgroup_parent}
        if record.netns_name:
            # CNI DEL at recovery needs ADD's container id (the target), ifname and netns path.
            facts |= {"netns_name": record.netns_name, "netns_path": str(netns.netns_path(record.netns_name)),
                      "ifname": CNI_IFNAME, "network": self._network.name}
        return facts

    def _make_sandbox(self, intent: Intent, record: SandboxRecord, config, ns, hostname: str) -> None:
        step = self._step
        with contextlib.ExitStack() as undo:
            files_dir, pin_dir = Path(record.files_dir), Path(record.pin_dir)
            step(intent, "dirs")
            files_dir.mkdir(mode=0o755)
            undo.callback(remove_tree, files_dir, ignore_errors=True)
            pin_dir.mkdir(mode=0o700)
            undo.callback(remove_tree, pin_dir, ignore_errors=True)

            if ns.network != NODE:
                self._set_up_network(intent, record, config, undo)
            step(intent, "pod_files")
            self._write_pod_files(record, config)
            kinds = tuple(k for k, mode in (("ipc", ns.ipc), ("uts", ns.network)) if mode != NODE)
            if kinds:
                step(intent, "pin_namespaces")
                pod_namespaces.pin_namespaces(pin_dir, hostname, kinds=kinds)
                undo.callback(pod_namespaces.unpin_namespaces, pin_dir)
            if ns.pid == POD:
                step(intent, "pid_infra")
                pod_namespaces.start_pid_infra(pin_dir)
                record.pid_infra = True
                undo.callback(pod_namespaces.stop_pid_infra, pin_dir)
            undo.callback(cgroups.remove, record.cgroup_parent)
            step(intent, "save")
            self._records.save(record)
            undo.pop_all()
        crashpoints.reached("run_sandbox:saved")  # saved, intent still open: recovery keeps the pod

    def _set_up_network(self, intent: Intent, record: SandboxRecord, config, undo: contextlib.ExitStack) -> None:
        self._step(intent, "netns")
        path = netns.create_netns(record.netns_name)
        undo.callback(netns.remove_netns, record.netns_name)
        m = config.metadata
        ip, mac = requested_address(config)
        self._step(intent, "cni_add")
        attachment = self._network.attach(record.id, path, m.name, m.namespace, m.uid, self._port_mappings(config),
                                          ip=ip, mac=mac)
        undo.callback(self._network.detach, record.id, path, self._port_mappings(config))
        record.ip = attachment.ip
        record.network = attachment.to_dict()

    def _step(self, intent: Intent, step: str) -> None:
        """The next step of RunPodSandbox, a crash point (`run_sandbox:<step>`). Only the steps that change
        what recovery does are written to the journal: _undo_run undoes every step whether it was
        reached or not, except CNI DEL, which needs ADD's cache. Each write is an fsync on the path of
        every RunPodSandbox and RestorePod."""
        if step in JOURNALED_RUN_STEPS:
            self._intents.advance(intent, step)
        else:
            crashpoints.reached(f"{Operation.RUN_SANDBOX.value}:{step}")

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
        """Tear down the pod's network and namespaces. The caller has stopped its containers. Idempotent:
        a retry after a failure or a crash does again whatever is left."""
        record = self._records.resolve(sandbox_id)
        if record is None:
            return
        with self._lock, self._intents.track(Operation.STOP_SANDBOX, record.id) as intent:
            self._tear_down(record, intent)

    def _tear_down(self, record: SandboxRecord, intent: Intent) -> None:
        # NOTREADY first: from the first thing torn down on, the pod must not be reported ready, nor
        # take new containers, whether or not this call gets to its end.
        if record.state != SandboxState.NOTREADY:
            record.state = SandboxState.NOTREADY
            self._records.save(record)
        config = self.config_of(record)
        if record.netns_name:
            self._intents.advance(intent, "network")
            path = netns.netns_path(record.netns_name)
            self._network.detach(record.id, path, self._port_mappings(config))
            netns.remove_netns(record.netns_name)
        self._intents.advance(intent, "namespaces")
        pins = Path(record.pin_dir)
        if record.pid_infra:
            pod_namespaces.stop_pid_infra(pins)
        pod_namespaces.unpin_namespaces(pins)

    def remove(self, sandbox_id: str) -> None:
        """Remove what is left after stop. The caller has removed the pod's containers; runc containers
        of the pod that no record names (left by a crash) are deleted here, and the removal fails
        (the pod stays, NOTREADY) while any process is left in the pod's cgroup. Idempotent."""
        record = self._records.resolve(sandbox_id)
        if record is None:
            return
        with self._lock, self._intents.track(Operation.REMOVE_SANDBOX, record.id) as intent:
            self._tear_down(record, intent)
            self._intents.advance(intent, "containers")
            self._remove_leftover_containers(record)
            self._intents.advance(intent, "cgroup")
            cgroups.remove(record.cgroup_parent)
            self._intents.advance(intent, "files")
            remove_tree(record.files_dir, ignore_errors=True)
            remove_tree(record.pin_dir, ignore_errors=True)
            self._intents.advance(intent, "forget")
            self._records.delete(record.id)
            self._names.pop(record.name, None)
        log.info("pod sandbox removed", extra={"sandbox": record.id})

    def _remove_leftover_containers(self, record: SandboxRecord) -> None:
        """Delete the pod's runc containers and kill what is left in its cgroup, or refuse to go on."""
        if self._runc is not None:
            try:
                leftover = sandbox_leftovers.runc_containers_of_sandbox(self._runc.binary, self._runc.root, record.id)
            except (OSError, RuntimeError, ValueError) as e:
                raise FailedPrecondition(f"pod sandbox {record.id}: cannot list its runc containers: {e}") from e
            for container_id in leftover:
                log.warning("pod sandbox removal: runc container with no record found in the pod; deleting it",
                            extra={"sandbox": record.id, "container": container_id})
                try:
                    self._runc.delete(container_id, force=True)
                except Exception as e:  # noqa: BLE001 - reported with the cgroup check below
                    log.error("deleting a leftover runc container failed",
                              extra={"sandbox": record.id, "container": container_id, "error": str(e)})
        pids = sandbox_leftovers.cgroup_tree_processes(record.cgroup_parent)
        if not pids:
            return
        log.warning("pod sandbox removal: processes with no container left in the pod's cgroup; killing them",
                    extra={"sandbox": record.id, "cgroup": record.cgroup_parent, "pids": pids})
        alive = sandbox_leftovers.kill_processes(pids)
        if alive:
            raise FailedPrecondition(
                f"pod sandbox {record.id}: processes {alive} still run in its cgroup {record.cgroup_parent} "
                "after its containers were removed; it stays (NOTREADY) until they are gone: retry the removal")

    # ---- recovery after a crash ----------------------------------------------------------------

    def recover(self, intents: list[Intent]) -> None:
        """At start-up, after load() and before serving: finish or undo what a killed daemon left
        half-done (intents of RUN/STOP/REMOVE_SANDBOX, closed here), then release what no sandbox
        record owns. Idempotent: a crash during recovery is repaired by the next one."""
        unfinished: set[str] = set()
        handlers = {Operation.RUN_SANDBOX: self._recover_run, Operation.STOP_SANDBOX: self._recover_stop,
                    Operation.REMOVE_SANDBOX: self._recover_remove}
        for intent in intents:
            handler = handlers.get(intent.operation)
            if handler is None:
                continue
            try:
                handler(intent)
            except Exception as e:  # noqa: BLE001 - one bad intent must not keep the daemon from starting
                unfinished.add(intent.target)
                log.error("recovery: could not repair an interrupted sandbox operation; will retry at next start",
                          extra={"intent": intent.to_doc(), "error": str(e)})
                continue
            self._intents.finish(intent)
        self.sweep(exclude=unfinished)

    def _recover_run(self, intent: Intent) -> None:
        if self._records.get(intent.target) is not None:
            log.warning("recovery: RunPodSandbox had saved its sandbox before the crash; kept",
                        extra={"sandbox": intent.target, "step": intent.step})
            return
        self._undo_run(intent.target, intent.facts, cni=_reached(intent, "cni_add"))
        log.warning("recovery: RunPodSandbox interrupted before the sandbox was saved; undid everything it made",
                    extra={"sandbox": intent.target, "step": intent.step})

    def _undo_run(self, sandbox_id: str, facts: dict[str, str], cni: bool) -> None:
        """Reverse order of RunPodSandbox; each step is a no-op for what was never made."""
        pin_dir = Path(facts["pin_dir"]) if facts.get("pin_dir") else self._pin_root / sandbox_id
        pod_namespaces.kill_pid_infra_launchers(pod_namespaces.pid_infra_launchers(self._pin_root).get(pin_dir, []))
        pod_namespaces.stop_pid_infra(pin_dir)
        pod_namespaces.unpin_namespaces(pin_dir)
        netns_name = facts.get("netns_name", "")
        if cni and netns_name:
            # DEL with ADD's container id, ifname and netns (what attach cached before ADD): releases the
            # IP, the veth, the portmap rules and the cache entry. Harmless when ADD never ran.
            path = netns.netns_path(netns_name) if netns_name else None
            self._network.detach(sandbox_id, path)
        if netns_name:
            netns.remove_netns(netns_name)
        if facts.get("cgroup_parent"):
            cgroups.remove(facts["cgroup_parent"])
        remove_tree(facts.get("files_dir") or self._dir / sandbox_id, ignore_errors=True)
        remove_tree(pin_dir, ignore_errors=True)

    def _recover_stop(self, intent: Intent) -> None:
        record = self._records.get(intent.target)
        if record is None:
            return
        self.stop(record.id)
        log.warning("recovery: StopPodSandbox interrupted; finished tearing the pod down (NOTREADY)",
                    extra={"sandbox": record.id, "step": intent.step})

    def _recover_remove(self, intent: Intent) -> None:
        record = self._records.get(intent.target)
        if record is None:
            return
        try:
            self.remove(record.id)
        except FailedPrecondition as e:
            # Its containers are the container recovery's; the kubelet's retry removes the pod then.
            log.warning("recovery: RemovePodSandbox interrupted; pod torn down but kept (NOTREADY): %s", e.message,
                        extra={"sandbox": record.id, "step": intent.step})
            return
        log.warning("recovery: RemovePodSandbox interrupted; finished removing the pod",
                    extra={"sandbox": record.id, "step": intent.step})

    # ---- the sweep: what no record owns --------------------------------------------------------

    def sweep(self, exclude: set[str] = frozenset()) -> None:
        """Release what no sandbox record (nor an intent in `exclude`) owns: netns with our prefix, IP
        allocations and CNI cache entries of unknown ids, pod dirs and pid infra processes. Empty
        cgroups are swept by `sweep_cgroups`, once, after the containers' recovery (recovery.py):
        before it, an orphaned container still holds its pod's cgroup."""
        known = {r.id for r in self._records.all()} | set(exclude)
        self._sweep_network(known)
        self._sweep_pod_dirs(known)

    def _sweep_network(self, known: set[str]) -> None:
        owned_netns = {r.netns_name for r in self._records.all() if r.netns_name}
        owned_netns |= {f"{self._netns_prefix}{i[:16]}" for i in known}
        for name in sandbox_leftovers.netns_names_with_prefix(netns.NETNS_DIR, self._netns_prefix):
            if name not in owned_netns:
                self._release_orphan("netns", name, lambda n=name: netns.remove_netns(n))
        orphans = {i for i in self._network.cached_sandbox_ids() if i not in known}
        allocations = [a for d in host_local_network_dirs(self._network.conflist)
                       for a in sandbox_leftovers.host_local_allocations(d)]
        orphans |= {a.owner for a in allocations if a.owner and a.owner not in known}
        for sandbox_id in sorted(orphans):
            self._release_orphan("CNI attachment (IP, veth, portmap rules, cache)", sandbox_id,
                                 lambda s=sandbox_id: self._network.detach(s, None))
        # What DEL could not release (an allocation of another ifname, an id CNI refuses): the file goes.
        for allocation in allocations:
            if allocation.owner not in known and allocation.path.exists():
                self._release_orphan("host-local IP allocation", f"{allocation.ip} of {allocation.owner!r}",
                                     lambda p=allocation.path: p.unlink(missing_ok=True))
        for tmp in cache_temp_files(self._network.cache_dir):
            self._release_orphan("half-written CNI cache record", str(tmp), lambda p=tmp: p.unlink(missing_ok=True))

    def _sweep_pod_dirs(self, known: set[str]) -> None:
        launchers = pod_namespaces.pid_infra_launchers(self._pin_root)
        for pin_dir, pids in launchers.items():
            if pin_dir.name not in known:
                self._release_orphan("pid infra process", f"{pids} of {pin_dir}",
                                     lambda p=pids: pod_namespaces.kill_pid_infra_launchers(p))
        for name in sandbox_leftovers.child_dirs(self._pin_root):
            if name not in known:
                pin_dir = self._pin_root / name

                def release(d=pin_dir):
                    pod_namespaces.stop_pid_infra(d)
                    pod_namespaces.unpin_namespaces(d)
                    remove_tree(d)
                self._release_orphan("pinned namespaces dir", str(pin_dir), release)
        for name in sandbox_leftovers.child_dirs(self._dir):
            if name not in known:
                files_dir = self._dir / name
                self._release_orphan("pod files dir", str(files_dir), lambda d=files_dir: remove_tree(d))

    def sweep_cgroups(self, exclude: set[str] = frozenset()) -> None:
        """Remove the empty cgroups under the daemon's cgroup parent that no sandbox owns. One with
        processes belongs to a container (the container recovery's); it is logged and kept."""
        parent = self._cgroup_parent.rstrip("/")
        owned = {r.cgroup_parent.rstrip("/") for r in self._records.all()}
        owned |= {f"{parent}/{i}" for i in exclude}
        for name in sorted(sandbox_leftovers.cgroup_children(parent)):
            path = f"{parent}/{name}"
            if path in owned:
                continue
            pids = sandbox_leftovers.cgroup_tree_processes(path)
            if pids:
                log.warning("recovery: cgroup of no pod sandbox still holds processes; left to container recovery",
                            extra={"cgroup": path, "pids": pids})
                continue
            self._release_orphan("pod cgroup", path, lambda p=path: cgroups.remove(p))

    @staticmethod
    def _release_orphan(what: str, name: str, release) -> None:
        try:
            release()
        except Exception as e:  # noqa: BLE001 - the rest of the sweep goes on; next start retries
            log.error(f"recovery: found a {what} that no pod sandbox owns, and could not release it",
                      extra={"what": what, "object": name, "error": str(e)})
            return
        log.warning(f"recovery: found a {what} that no pod sandbox owns; released it",
                    extra={"what": what, "object": name})
