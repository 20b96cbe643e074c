# The two commands a newcomer needs (both install what they need first, and are safe to repeat):
#   make run    - the daemon on /run/pyshim/pyshim.sock with the built-in configuration
#   make test   - unit and integration tests against a real daemon, runc, conmon, CNI and registry
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test unit conformance bench bench-checkpoint bench-restore bench-lazy-restore bench-streaming bench-migrate bench-pod deps install clean

deps:
	bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml setup.py cri_api/api.proto $(wildcard criu_glue/criu_pb/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: deps $(STAMP)

run: install
	$(VENV)/bin/pyshim serve $(ARGS)

test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -ra $(or $(PYTEST_ARGS),oci pyshim criu_glue cri_api)

# critest (the CRI validation suite) against a daemon and registry of its own, with stand-in images;
# not part of `make test`: it needs critest ($$CRITEST or ../shared/tools/cri-tools/critest).
# ARGS="--busybox-only", "--focus REGEX", "--skip REGEX", "--log-dir DIR", "-- CRITEST-FLAGS".
conformance: install
	$(PY) -m integration.conformance $(ARGS)

bench: install
	$(PY) -m bench.lifecycle

# Checkpoint time, frozen time and archive size next to bare runc checkpoint (ARGS="--sizes 16,256 --runs 3").
bench-checkpoint: install
	$(PY) -m bench.checkpoint $(ARGS)

bench-restore: install
	$(PY) -m bench.restore $(ARGS)

# Lazy (post-copy) local restore vs eager: StartContainer times and time until every page arrived.
bench-lazy-restore: install
	$(PY) -m bench.lazy_restore $(ARGS)

# Exec round trip (ExecSync, streaming Exec, bare runc exec) and port-forward throughput vs a direct
# connection (ARGS="--runs 50 --mib 256").
bench-streaming: install
	$(PY) -m bench.streaming $(ARGS)

# pyshim migrate downtime A -> B through a registry vs bare runc checkpoint + restore + a raw TCP copy
# (ARGS="--sizes 16,256 --runs 3"); ARGS=--lazy: `migrate --lazy` vs eager (bench/migrate_lazy.py).
bench-migrate: install
	$(PY) -m bench.migrate $(ARGS)

# CheckpointPod frozen time vs sequential CheckpointContainer, RestorePod+StartContainer vs sequential
# restores, pods of 1, 2 and 4 containers x 64 MiB (ARGS="--sizes 1,2,4 --runs 3").
bench-pod: install
	$(PY) -m bench.pod_checkpoint $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info cri_api/*_pb2*.py cri_api/*_pb2.pyi criu_glue/criu_pb/*_pb2.py
