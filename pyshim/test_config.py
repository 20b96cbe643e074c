"""The configuration file: what it accepts, what it refuses, and that `pyshim config` prints TOML
that loads back to the defaults."""
from __future__ import annotations

import tomllib

import pytest

from pyshim.config import Config, default_config_toml, load_config
from pyshim.errors import InvalidArgument


def write(tmp_path, text: str) -> str:
    path = tmp_path / "pyshim.toml"
    path.write_text(text)
    return str(path)


def test_mirrors_are_read_from_their_table(tmp_path):
    config = load_config(write(tmp_path, '[images.mirrors]\n"registry.k8s.io" = ["10.0.0.5:5000", "mirror.lan"]\n'))
    assert config.images.mirrors == {"registry.k8s.io": ["10.0.0.5:5000", "mirror.lan"]}


@pytest.mark.parametrize("text, named", [
    ('[images]\nmirrors = ["a"]\n', "must be a table"),
    ('[images.mirrors]\n"docker.io" = "mirror.lan"\n', "must be a list"),
    ('[images.mirrors]\n"docker.io" = ["https://mirror.lan"]\n', "https://mirror.lan"),
    ('[images.mirrors]\n"docker.io" = ["mirror.lan/v2"]\n', "mirror.lan/v2"),
    ('[images.mirrors]\n"docker.io" = [""]\n', "''"),
])
def test_a_mirror_that_is_not_a_host_is_refused_with_its_name(tmp_path, text, named):
    with pytest.raises(InvalidArgument) as caught:
        load_config(write(tmp_path, text))
    assert named in str(caught.value)


def test_an_unknown_key_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown configuration key images.'mirror'"):
        load_config(write(tmp_path, '[images]\nmirror = {}\n'))


def test_the_printed_defaults_load_back_to_the_defaults(tmp_path):
    text = default_config_toml()
    tomllib.loads(text)  # valid TOML, including the empty mirrors table
    assert load_config(write(tmp_path, text)) == Config()
