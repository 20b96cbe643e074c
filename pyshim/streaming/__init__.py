"""pyshim's CRI streaming server: the URLs that Exec, Attach and PortForward return.

Knows HTTP upgrades, SPDY/3.1, WebSocket and the Kubernetes remotecommand and port-forward protocols;
knows nothing of runc or conmon: what an exec, an attach or a port-forward does is handed in as a
Backend (pyshim.internal.streams implements it).
"""
