"""Attach pod network namespaces to a CNI network (CNI spec 1.0 conflist semantics).

We execute the plugins ourselves rather than through a library: the protocol is small
(environment variables in, JSON on stdin, JSON result or error on stdout) and this
keeps pyshim free of a Go dependency.

ADD runs the chain in order, each plugin getting the previous one's result as
prevResult. DEL runs it in reverse, each plugin getting the final ADD result. What DEL
needs (the conflist as it was, CNI_ARGS, port mappings, the ADD result) is written to
cache_dir before ADD starts and kept until DEL succeeds, so a sandbox can be torn down
after a daemon restart, a crash mid-ADD, or a change of the configured network.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyshim.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from pyshim.internal.netns import is_ns_pin

CNI_IFNAME = "eth0"
# Conflists need chaining (prevResult), which arrived in 0.3.0.
SUPPORTED_CNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
DEFAULT_CNI_VERSION = "1.0.0"
PLUGIN_TIMEOUT = 120.0
CACHE_FORMAT = 1
PROTOCOLS = ("tcp", "udp", "sctp")

# Where plugins such as portmap find iptables, whatever PATH the daemon was started with.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PLUGIN_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CNIConfigError(FailedPrecondition):
    """The network configuration is unusable; no sandbox can be attached until fixed."""


# CNI spec, "Error": 11 is "try again later"; the plugin expects the same call to work then.
CNI_ERROR_TRY_AGAIN_LATER = 11


class CNIPluginError(Exception):
    """A plugin failed; carries the plugin's own CNI error code (`cni_code`) and message.

    A domain error of its own: the server maps it to a status code (see servicer.status_of)."""

    def __init__(self, message: str, plugin: str = "", command: str = "", cni_code: int | None = None, msg: str = "",
                 details: str = ""):
        super().__init__(message)
        self.message = message
        self.plugin = plugin
        self.command = command
        self.cni_code = cni_code
        self.msg = msg
        self.details = details

    def like(self, message: str, command: str) -> "CNIPluginError":
        """The same failure (same class, plugin and CNI code) with another message."""
        return type(self)(message, plugin=self.plugin, command=command, cni_code=self.cni_code, msg=self.msg,
                          details=self.details)


class CNIPluginBusy(CNIPluginError):
    """A plugin timed out or said "try again later": the same call may well work in a moment."""


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def validated(self) -> PortMapping:
        protocol = str(self.protocol).lower()
        if protocol not in PROTOCOLS:
            raise InvalidArgument(f"port mapping {self}: protocol must be one of {PROTOCOLS}")
        for what, port in (("host", self.host_port), ("container", self.container_port)):
            if not isinstance(port, int) or not 0 <= port <= 65535:
                raise InvalidArgument(f"port mapping {self}: {what} port must be 0-65535")
        if self.container_port == 0:
            raise InvalidArgument(f"port mapping {self}: container port must not be 0")
        if self.host_ip:
            try:
                ipaddress.ip_address(self.host_ip)
            except ValueError as exc:
                raise InvalidArgument(f"port mapping {self}: host IP is not an IP address") from exc
        return PortMapping(self.host_port, self.container_port, protocol, self.host_ip)

    def to_runtime_config(self) -> dict:
        """The entry of the `portMappings` capability (CNI conventions)."""
        entry = {"hostPort": self.host_port, "containerPort": self.container_port, "protocol": self.protocol}
        if self.host_ip:
            entry["hostIP"] = self.host_ip
        return entry

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PortMapping:
        return cls(int(data["host_port"]), int(data["container_port"]), data.get("protocol", "tcp"), data.get("host_ip", ""))


@dataclass
class NetworkAttachment:
    interface: str
    ip: str
    prefix_len: int
    gateway: str
    mac: str
    raw_result: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetworkAttachment:
        return cls(
            interface=data["interface"],
            ip=data["ip"],
            prefix_len=int(data["prefix_len"]),
            gateway=data.get("gateway", ""),
            mac=data.get("mac", ""),
            raw_result=data.get("raw_result", {}),
        )

    @classmethod
    def from_result(cls, result: dict, ifname: str) -> NetworkAttachment:
        """Pick the pod's address out of a CNI result: the sandbox interface's, IPv4 first."""
        interfaces = result.get("interfaces") or []
        ips = result.get("ips") or []

        def interface_of(entry: dict) -> dict | None:
            index = entry.get("interface")
            if isinstance(index, int) and 0 <= index < len(interfaces):
                return interfaces[index]
            return None

        def is_pod_ip(entry: dict) -> bool:
            iface = interface_of(entry)
            # Plugins that leave out the interface index are taken at their word.
            return iface is None or (iface.get("name") == ifname and bool(iface.get("sandbox")))

        candidates = [e for e in ips if is_pod_ip(e)] or ips
        candidates.sort(key=lambda e: ipaddress.ip_interface(e["address"]).version)
        sandbox_iface = next((i for i in interfaces if i.get("name") == ifname and i.get("sandbox")), {})
        if not candidates:
            return cls(ifname, "", 0, "", sandbox_iface.get("mac", ""), result)
        chosen = candidates[0]
        address = ipaddress.ip_interface(chosen["address"])
        iface = interface_of(chosen) or sandbox_iface
        return cls(
            interface=iface.get("name", ifname),
            ip=str(address.ip),
            prefix_len=address.network.prefixlen,
            gateway=chosen.get("gateway", "") or "",
            mac=iface.get("mac", ""),
            raw_result=result,
        )


def default_conflist(network_name: str, bridge: str, subnet: str, data_dir: Path) -> dict:
    """The embedded network: a bridge with host-local IPAM, plus portmap for hostPorts.

    IP allocations live in data_dir (under the daemon's own root), so daemons running
    side by side never hand out or release each other's addresses. No masquerading:
    pods only talk to each other and to the host.
    """
    network = ipaddress.ip_network(subnet, strict=True)
    return {
        "cniVersion": DEFAULT_CNI_VERSION,
        "name": network_name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(network)}]],
                    "routes": [{"dst": "0.0.0.0/0" if network.version == 4 else "::/0"}],
                    "dataDir": str(data_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def load_conflist(path: Path) -> dict:
    """Read and check a user-provided .conflist file."""
    path = Path(path)
    try:
        conflist = json.loads(path.read_text())
    except OSError as exc:
        raise CNIConfigError(f"reading CNI conflist {path}: {exc}") from exc
    except ValueError as exc:
        raise CNIConfigError(f"CNI conflist {path} is not valid JSON: {exc}") from exc
    validate_conflist(conflist, source=str(path))
    return conflist


def validate_conflist(conflist: dict, source: str = "conflist") -> None:
    if not isinstance(conflist, dict):
        raise CNIConfigError(f"{source}: a conflist must be a JSON object")
    name = conflist.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CNIConfigError(f"{source}: 'name' must be a non-empty string of [A-Za-z0-9_.-], got {name!r}")
    version = conflist.get("cniVersion")
    if version not in SUPPORTED_CNI_VERSIONS:
        raise CNIConfigError(f"{source}: cniVersion {version!r} not supported; want one of {SUPPORTED_CNI_VERSIONS}")
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise CNIConfigError(f"{source}: 'plugins' must be a non-empty list")
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict):
            raise CNIConfigError(f"{source}: plugins[{index}] must be an object")
        for plugin_type in _types_of(plugin):
            if not isinstance(plugin_type, str) or not _PLUGIN_TYPE_RE.match(plugin_type):
                raise CNIConfigError(f"{source}: plugins[{index}] has invalid type {plugin_type!r}")


class CNINetwork:
    def __init__(self, conflist: dict, plugin_dirs: list[Path], cache_dir: Path, timeout: float = PLUGIN_TIMEOUT):
        validate_conflist(conflist)
        self.conflist = copy.deepcopy(conflist)
        self.plugin_dirs = [Path(d) for d in plugin_dirs]
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout

    @property
    def name(self) -> str:
        return self.conflist["name"]

    def ready(self) -> tuple[bool, str]:
        """Whether every plugin the chain needs (IPAM included) is installed."""
        missing = [t for t in self._required_types(self.conflist) if self._find_plugin(t) is None]
        if missing:
            dirs = ":".join(str(d) for d in self.plugin_dirs) or "(no plugin dirs)"
            return False, f"CNI network {self.name!r}: plugin(s) {', '.join(missing)} not found in {dirs}"
        return True, ""

    def attach(
        self,
        sandbox_id: str,
        netns_path: Path,
        pod_name: str,
        pod_namespace: str,
        pod_uid: str,
        port_mappings: list[PortMapping] = (),
        ip: str = "",
        mac: str = "",
    ) -> NetworkAttachment:
        """ADD the sandbox's network namespace to the network; undo it all on failure.

        `ip` / `mac` ask for a fixed address (host-local's and bridge's IP= and MAC= CNI_ARGS):
        a pod restored after a host restart comes back where its peers knew it."""
        _check_sandbox_id(sandbox_id)
        mappings = _effective_mappings(port_mappings)
        cni_args = _cni_args(sandbox_id, pod_name, pod_namespace, pod_uid, ip=ip, mac=mac)
        ok, reason = self.ready()
        if not ok:
            raise CNIConfigError(reason)
        if not Path(netns_path).exists():
            raise FailedPrecondition(f"sandbox {sandbox_id}: network namespace {netns_path} does not exist")
        if self._record_path(sandbox_id).exists():
            raise AlreadyExists(
                f"sandbox {sandbox_id} is already attached to CNI network {self.name!r} (or was not detached)"
            )

        record = {
            "format": CACHE_FORMAT,
            "sandbox_id": sandbox_id,
            "conflist": self.conflist,
            "ifname": CNI_IFNAME,
            "netns": str(netns_path),
            "cni_args": cni_args,
            "port_mappings": [m.to_dict() for m in mappings],
            "result": None,
        }
        # Written before ADD: a crash half-way must still leave what DEL needs.
        self._write_record(sandbox_id, record)

        plugins = self.conflist["plugins"]
        result: dict | None = None
        for index, plugin in enumerate(plugins):
            if plugin.get("type") == "bridge":
                _give_bridge_a_mac(str(plugin.get("bridge") or "cni0"))
            try:
                result = self._exec(
                    "ADD", plugin, self.conflist, sandbox_id, str(netns_path), cni_args, mappings, result
                )
            except CNIPluginError as add_error:
                raise self._roll_back(add_error, plugins[: index + 1], record, result) from None
        if result is None:
            raise CNIPluginError(f"sandbox {sandbox_id}: CNI network {self.name!r} returned no result")
        record["result"] = result
        self._write_record(sandbox_id, record)
        return NetworkAttachment.from_result(result, CNI_IFNAME)

    def detach(self, sandbox_id: str, netns_path: Path | None, port_mappings: list[PortMapping] = ()) -> None:
        """DEL the sandbox from the network, plugins in reverse order. Idempotent.

        Uses what attach recorded when there is a record; the arguments are the
        fallback for a sandbox with none. A netns that is gone is passed as an empty
        CNI_NETNS, which tells plugins to release what they can (IPs, iptables rules).
        """
        _check_sandbox_id(sandbox_id)
        record = self._read_record(sandbox_id)
        if record is None:
            record = {
                "conflist": self.conflist,
                "ifname": CNI_IFNAME,
                "cni_args": _cni_args(sandbox_id, "", "", ""),
                "port_mappings": [m.to_dict() for m in _effective_mappings(port_mappings)],
                "result": None,
            }
        netns = str(netns_path) if netns_path and _is_live_netns(Path(netns_path)) else ""
        errors = self._delete_chain(sandbox_id, record, record["conflist"]["plugins"], netns, record.get("result"))
        if errors:
            raise errors[0].like(
                f"sandbox {sandbox_id}: detaching from CNI network {record['conflist']['name']!r} failed: "
                + "; ".join(e.message for e in errors), command="DEL")
        self._record_path(sandbox_id).unlink(missing_ok=True)

    def cached_attachment(self, sandbox_id: str) -> NetworkAttachment | None:
        """The attachment recorded for a sandbox (e.g. to rebuild state after a restart)."""
        _check_sandbox_id(sandbox_id)
        record = self._read_record(sandbox_id)
        if record is None or not record.get("result"):
            return None
        return NetworkAttachment.from_result(record["result"], record.get("ifname", CNI_IFNAME))

    def cached_sandbox_ids(self) -> list[str]:
        """Sandboxes with a record: attached, or whose ADD/DEL did not finish."""
        if not self.cache_dir.is_dir():
            return []
        return sorted(p.stem for p in self.cache_dir.glob("*.json"))

    # -- chain execution -------------------------------------------------------------

    def _roll_back(
        self, add_error: CNIPluginError, added: list[dict], record: dict, last_result: dict | None
    ) -> CNIPluginError:
        """DEL what a failed ADD did; return the error the caller should see."""
        # The failing plugin is included: it may have half-done its work, and DEL
        # of something never created is a no-op by the spec.
        errors = self._delete_chain(record["sandbox_id"], record, added, record["netns"], last_result)
        if not errors:
            self._record_path(record["sandbox_id"]).unlink(missing_ok=True)
            return add_error
        # Keep the record so that a later detach can retry the cleanup.
        undo = "; ".join(e.message for e in errors)
        return add_error.like(f"{add_error.message} (and undoing the ADD failed, detach must be retried: {undo})",
                              command="ADD")

    def _delete_chain(
        self, sandbox_id: str, record: dict, plugins: list[dict], netns: str, prev_result: dict | None
    ) -> list[CNIPluginError]:
        mappings = [PortMapping.from_dict(m) for m in record.get("port_mappings", [])]
        errors = []
        # Every plugin gets its DEL even if a later one failed: releasing the IP must
        # not hinge on, say, an iptables hiccup in portmap.
        for plugin in reversed(plugins):
            try:
                self._exec("DEL", plugin, record["conflist"], sandbox_id, netns, record["cni_args"], mappings, prev_result)
            except CNIPluginError as exc:
                errors.append(exc)
        return errors

    def _exec(
        self,
        command: str,
        plugin: dict,
        conflist: dict,
        sandbox_id: str,
        netns: str,
        cni_args: str,
        mappings: list[PortMapping],
        prev_result: dict | None,
    ) -> dict | None:
        plugin_type = plugin["type"]
        executable = self._find_plugin(plugin_type)
        where = f"CNI plugin {plugin_type} {command} for sandbox {sandbox_id} on network {conflist['name']!r}"
        if executable is None:
            raise CNIPluginError(f"{where}: plugin not found in {':'.join(map(str, self.plugin_dirs))}",
                                 plugin=plugin_type, command=command)  # fmt: skip
        stdin = json.dumps(_plugin_config(plugin, conflist, mappings, prev_result)).encode()
        try:
            proc = subprocess.run(
                [str(executable)],
                input=stdin,
                capture_output=True,
                env=self._plugin_env(command, sandbox_id, netns, cni_args),
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise CNIPluginBusy(f"{where}: timed out after {self.timeout}s", plugin=plugin_type, command=command) from exc
        except OSError as exc:
            raise CNIPluginError(f"{where}: cannot run {executable}: {exc}", plugin=plugin_type, command=command) from exc
        if proc.returncode != 0:
            raise _plugin_error(where, plugin_type, command, proc)
        if command != "ADD":
            return None
        try:
            result = json.loads(proc.stdout)
        except ValueError as exc:
            raise CNIPluginError(f"{where}: result is not JSON: {proc.stdout[:500]!r}",
                                 plugin=plugin_type, command=command) from exc  # fmt: skip
        if not isinstance(result, dict):
            raise CNIPluginError(f"{where}: result is not a JSON object", plugin=plugin_type, command=command)
        return result

    def _plugin_env(self, command: str, sandbox_id: str, netns: str, cni_args: str) -> dict[str, str]:
        # Plugins get the daemon's environment (PATH for iptables, etc.) minus any stray
        # CNI_* of its own, which would otherwise leak into the call.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env["PATH"] = ":".join(filter(None, [env.get("PATH", ""), _SYSTEM_PATH]))
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=sandbox_id,
            CNI_NETNS=netns,
            CNI_IFNAME=CNI_IFNAME,
            CNI_ARGS=cni_args,
            CNI_PATH=":".join(str(d) for d in self.plugin_dirs),
        )
        return env

    def _find_plugin(self, plugin_type: str) -> Path | None:
        for directory in self.plugin_dirs:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None

    @staticmethod
    def _required_types(conflist: dict) -> list[str]:
        return [t for plugin in conflist["plugins"] for t in _types_of(plugin)]

    # -- persistence -----------------------------------------------------------------

    def _record_path(self, sandbox_id: str) -> Path:
        return self.cache_dir / f"{sandbox_id}.json"

    def _read_record(self, sandbox_id: str) -> dict | None:
        path = self._record_path(sandbox_id)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Internal(f"sandbox {sandbox_id}: reading CNI cache record {path}: {exc}") from exc
        if record.get("format") != CACHE_FORMAT:
            raise Internal(f"sandbox {sandbox_id}: CNI cache record {path} has unknown format {record.get('format')!r}")
        return record

    def _write_record(self, sandbox_id: str, record: dict) -> None:
        path = self._record_path(sandbox_id)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{sandbox_id}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise Internal(f"sandbox {sandbox_id}: writing CNI cache record {path}: {exc}") from exc


def host_local_network_dirs(conflist: dict) -> list[Path]:
    """Where host-local keeps this network's IP allocations, for each host-local IPAM with an
    explicit dataDir (`<dataDir>/<network name>`, one file per IP naming its owner). A conflist
    that leaves dataDir out shares host-local's default with every other runtime on the node: not
    listed, so that recovery never releases another runtime's addresses."""
    dirs = []
    for plugin in conflist.get("plugins") or []:
        ipam = plugin.get("ipam") if isinstance(plugin, dict) else None
        if isinstance(ipam, dict) and ipam.get("type") == "host-local" and ipam.get("dataDir"):
            dirs.append(Path(ipam["dataDir"]) / conflist["name"])
    return dirs


def cache_temp_files(cache_dir: Path) -> list[Path]:
    """Half-written CNI cache records a crash left (written to a temp file, then renamed)."""
    return sorted(Path(cache_dir).glob(".*.tmp")) if Path(cache_dir).is_dir() else []


def _types_of(plugin: dict) -> list:
    """A plugin's own type and, if it delegates IP allocation, its IPAM plugin's."""
    types = [plugin.get("type")]
    ipam = plugin.get("ipam")
    if isinstance(ipam, dict) and ipam.get("type"):
        types.append(ipam["type"])
    return types


def _plugin_config(plugin: dict, conflist: dict, mappings: list[PortMapping], prev_result: dict | None) -> dict:
    """The per-plugin stdin of a conflist execution (CNI spec, 'Deriving execution configuration')."""
    config = copy.deepcopy(plugin)
    config["cniVersion"] = conflist["cniVersion"]
    config["name"] = conflist["name"]
    capabilities = plugin.get("capabilities") or {}
    runtime_config = {}
    # Runtime data only goes to plugins that declare the capability for it.
    if capabilities.get("portMappings") and mappings:
        runtime_config["portMappings"] = [m.to_runtime_config() for m in mappings]
    if runtime_config:
        config["runtimeConfig"] = runtime_config
    else:
        config.pop("runtimeConfig", None)
    if prev_result is not None:
        config["prevResult"] = prev_result
    else:
        config.pop("prevResult", None)
    return config


def _plugin_error(where: str, plugin_type: str, command: str, proc: subprocess.CompletedProcess) -> CNIPluginError:
    stdout = proc.stdout.decode(errors="replace").strip()
    stderr = proc.stderr.decode(errors="replace").strip()
    try:
        error = json.loads(stdout)
    except ValueError:
        error = None
    if isinstance(error, dict) and ("msg" in error or "code" in error):
        code = error.get("code")
        msg = str(error.get("msg", ""))
        details = str(error.get("details", "") or "")
        text = msg + (f" ({details})" if details else "")
        error_class = CNIPluginBusy if code == CNI_ERROR_TRY_AGAIN_LATER else CNIPluginError
        return error_class(f"{where} failed: {text} [CNI error code {code}]",
                           plugin=plugin_type, command=command, cni_code=code, msg=msg, details=details)  # fmt: skip
    text = stderr or stdout or f"exit status {proc.returncode}, no output"
    return CNIPluginError(f"{where} failed: {text}", plugin=plugin_type, command=command, msg=text)


def _give_bridge_a_mac(name: str) -> None:
    """Give an existing bridge with the all-zero MAC a fixed random one, so the bridge plugin can ADD.

    A bridge whose kernel-assigned MAC was never fixed takes its lowest port's MAC and falls back to
    00:00:00:00:00:00 when its last port goes. The bridge plugin fixes the MAC only after IPAM
    succeeded, so a first ADD that IPAM refused (a requested IP outside the range) leaves a zero-MAC
    bridge, and every later ADD then fails with "could not set bridge's mac: invalid argument"."""
    try:
        current = Path(f"/sys/class/net/{name}/address").read_text().strip()
    except OSError:
        return  # no bridge yet: the plugin creates it
    if current.strip("0:"):
        return
    mac = ":".join(f"{b:02x}" for b in bytes([0x02]) + os.urandom(5))  # locally administered, unicast
    from pyroute2 import IPRoute  # noqa: PLC0415 - only needed on this rare repair path

    try:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)
            if index:
                ipr.link("set", index=index[0], address=mac)
    except Exception as exc:  # noqa: BLE001 - the plugin's own error then says what is wrong
        raise CNIConfigError(f"bridge {name} has no MAC address and setting one failed: {exc}") from exc


def _effective_mappings(port_mappings) -> list[PortMapping]:
    # hostPort 0 means "no host port" in Kubernetes: nothing for portmap to do.
    validated = [m.validated() for m in port_mappings or ()]
    return [m for m in validated if m.host_port != 0]


def _cni_args(sandbox_id: str, pod_name: str, pod_namespace: str, pod_uid: str, ip: str = "", mac: str = "") -> str:
    # The keys kubelet-era runtimes pass; IgnoreUnknown lets plugins that don't know
    # them accept the call.
    pairs = [
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", pod_namespace),
        ("K8S_POD_NAME", pod_name),
        ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
        ("K8S_POD_UID", pod_uid),
        ("IP", ip),
        ("MAC", mac),
    ]
    for key, value in pairs:
        if any(c in str(value) for c in ";=\n\x00"):
            raise InvalidArgument(f"{key} {value!r} cannot be passed in CNI_ARGS: it contains ';', '=' or a control character")
    return ";".join(f"{k}={v}" for k, v in pairs if v)


def _check_sandbox_id(sandbox_id: str) -> None:
    # It names the cache record file and goes into iptables chain hashes: keep it tame.
    if not isinstance(sandbox_id, str) or not _NAME_RE.match(sandbox_id) or len(sandbox_id) > 128:
        raise InvalidArgument(f"invalid sandbox id {sandbox_id!r}: want 1-128 of [A-Za-z0-9_.-]")


def _is_live_netns(path: Path) -> bool:
    # A pin file whose mount is gone is an empty regular file; a plugin given that would
    # fail to enter it instead of cleaning up without a netns.
    if str(path).startswith("/proc/"):
        return path.exists()
    return is_ns_pin(path)
