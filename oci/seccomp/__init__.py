"""Seccomp profiles: the RuntimeDefault profile (data, default.json) and the conversion of Docker-format
or OCI-format profiles into a container's runtime-spec `linux.seccomp` (profile.py)."""
