"""A small CRI client for pyshim's CLI and tests: the same calls kubelet and crictl make."""
from __future__ import annotations

import os

import grpc

from cri_api import api_pb2 as cri
from cri_api import api_pb2_grpc

DEFAULT_ENDPOINT = "unix:///run/pyshim/pyshim.sock"


def endpoint_from_env() -> str:
    return os.environ.get("PYSHIM_ENDPOINT") or os.environ.get("CONTAINER_RUNTIME_ENDPOINT") or DEFAULT_ENDPOINT


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = 120):
        endpoint = endpoint or endpoint_from_env()
        if endpoint.startswith("/"):
            endpoint = "unix://" + endpoint
        self.endpoint = endpoint
        self.timeout = timeout
        self.channel = grpc.insecure_channel(endpoint)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, service: str, method: str, request, timeout: float | None = None):
        stub = self.runtime if service == "runtime" else self.images
        return getattr(stub, method)(request, timeout=timeout or self.timeout)

    # Shorthands for the calls people make most.
    def version(self):
        return self.runtime.Version(cri.VersionRequest(), timeout=self.timeout)

    def checkpoint_pod(self, pod_id: str, output_path: str, container_ids: list[str],
                       options: dict[str, str] | None = None) -> None:
        self.runtime.CheckpointPod(cri.CheckpointPodRequest(
            pod_sandbox_id=pod_id, output_path=output_path, container_ids=container_ids, options=options or {}),
            timeout=self.timeout)

    def restore_pod(self, checkpoint_path: str, config, container_configs: list,
                    runtime_handler: str = "") -> "cri.RestorePodResponse":
        return self.runtime.RestorePod(cri.RestorePodRequest(
            checkpoint_path=checkpoint_path, config=config, container_configs=container_configs,
            runtime_handler=runtime_handler), timeout=self.timeout)

    def run_pod(self, config) -> str:
        return self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=self.timeout).pod_sandbox_id

    def create(self, pod_id: str, config, sandbox_config) -> str:
        return self.runtime.CreateContainer(cri.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config), timeout=self.timeout).container_id

    def start(self, container_id: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop(self, container_id: str, timeout: int = 10) -> None:
        self.runtime.StopContainer(cri.StopContainerRequest(container_id=container_id, timeout=timeout),
                                   timeout=self.timeout)

    def remove(self, container_id: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def status(self, container_id: str, verbose: bool = False):
        return self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=container_id, verbose=verbose),
                                            timeout=self.timeout)

    def pod_status(self, pod_id: str, verbose: bool = False):
        return self.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose),
                                             timeout=self.timeout)

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 0):
        return self.runtime.ExecSync(cri.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout),
                                     timeout=self.timeout + timeout)

    def pull(self, image: str) -> str:
        return self.images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=image)),
                                     timeout=self.timeout).image_ref
