"""Moving running containers: `pyshim migrate` (node to node) and the host-restart commands.

These are CRI clients, like kubelet: they drive the daemons only through their sockets (plus
pyshim's `pyshim-checkpoint-mode: stop` metadata on CheckpointContainer and the verbose status
info), so the same code moves a container between two daemons on one machine or on two.
"""
