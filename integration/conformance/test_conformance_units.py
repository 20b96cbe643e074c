"""The conformance runner's own logic, without critest, daemon or registry."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from integration.conformance import __main__ as runner
from integration.conformance.images import StandIn, stand_ins

GINKGO_TAIL = """\x1b[38;5;9m\x1b[1mSummarizing 2 Failures:\x1b[0m
  \x1b[38;5;9m[FAIL]\x1b[0m [k8s.io] Container runtime [It] a spec
  sigs.k8s.io/cri-tools/pkg/validate/container.go:1

Ran 3 of 5 Specs in 1.0 seconds
\x1b[38;5;9m\x1b[1mFAIL!\x1b[0m -- 1 Passed | 2 Failed | 0 Pending | 2 Skipped
"""


def test_summary_is_ginkgos_closing_part_without_colours():
    output = "noise\n• [FAILED] details\n" + GINKGO_TAIL
    text = runner.summary(output)
    assert text.splitlines()[0] == "Summarizing 2 Failures:"
    assert "FAIL! -- 1 Passed | 2 Failed | 0 Pending | 2 Skipped" in text
    assert "noise" not in text and "\x1b" not in text


def test_summary_of_a_green_run_starts_at_ran():
    assert runner.summary("•••\nRan 3 of 3 Specs in 1 seconds\nSUCCESS! -- 3 Passed\n").startswith("Ran 3 of 3")


def test_critest_command_joins_the_busybox_subset_and_the_users_skips():
    args = argparse.Namespace(busybox_only=True, skip="Seccomp", focus="Container", critest_args=["-ginkgo.v"],
                              registry_prefix=True)
    command = runner.critest_command(Path("/x/critest"), Path("/s.sock"), "127.0.0.1:5000", args)
    assert command[:7] == ["/x/critest", "--runtime-endpoint", "unix:///s.sock", "--image-endpoint",
                           "unix:///s.sock", "-registry-prefix", "127.0.0.1:5000"]
    assert command[command.index("-ginkgo.skip") + 1] == runner.BUSYBOX_ONLY_SKIP + "|Seccomp"
    assert command[command.index("-ginkgo.focus") + 1] == "Container"
    assert command[-1] == "-ginkgo.v"


def test_missing_critest_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("CRITEST", str(tmp_path / "critest"))
    with pytest.raises(SystemExit) as exit_:
        runner.find_critest()
    assert "CRITEST=" in str(exit_.value) and "cri-tools" in str(exit_.value)


def test_stand_ins_are_where_registry_prefix_looks():
    tools = {name: (b"", 0o755) for name in ("webserver", "nnp", "pgrep")}
    paths = {image.names[0]: image.registry_path for image in stand_ins(tools)}
    assert paths["registry.k8s.io/e2e-test-images/busybox:1.29-2"] == "e2e-test-images/busybox"
    assert paths["gcr.io/k8s-staging-cri-tools/test-image-predefined-group"] == \
        "k8s-staging-cri-tools/test-image-predefined-group"
    assert paths["registry.k8s.io/pause:3.9"] == "pause"
    assert StandIn(("k8s.gcr.io/pause:3.9",)).registry_path == "pause"


def test_without_registry_prefix_critest_gets_the_original_names():
    args = argparse.Namespace(busybox_only=False, skip="", focus="", critest_args=[], registry_prefix=False)
    command = runner.critest_command(Path("/x/critest"), Path("/s.sock"), "127.0.0.1:5000", args)
    assert "-registry-prefix" not in command


def test_stand_ins_are_where_the_mirrors_look_under_every_tag_critest_names():
    tools = {name: (b"", 0o755) for name in ("webserver", "nnp", "pgrep")}
    images = stand_ins(tools)
    paths = {path for image in images for path in image.mirror_paths}
    assert {"k8s-staging-cri-tools/test-image-tag:test", "k8s-staging-cri-tools/test-image-tag:all",
            "k8s-staging-cri-tools/test-image-tags:1", "k8s-staging-cri-tools/test-image-tags:3",
            "k8s-staging-cri-tools/test-image-latest:latest", "e2e-test-images/busybox:1.29-2",
            "pause:3.9"} <= paths
    # One image for the two pause names, so both registries give the same image ID.
    [pause] = [image for image in images if "k8s.gcr.io/pause:3.9" in image.names]
    assert "registry.k8s.io/pause:3.9" in pause.names
    mirrors = runner_mirrors(images)
    assert set(mirrors) == {"gcr.io", "registry.k8s.io", "k8s.gcr.io"}
    assert all(hosts == ("127.0.0.1:5000",) for hosts in mirrors.values())


def runner_mirrors(images):
    from integration.conformance.images import mirrors_for
    return mirrors_for([(image, Path("/unused")) for image in images], "127.0.0.1:5000")
