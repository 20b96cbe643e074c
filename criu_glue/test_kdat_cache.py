"""When pyshim writes CRIU's kernel-feature cache itself (the writing is in integration/test_criu_kdat.py)."""
import pytest

from criu_glue import kdat_cache


def test_auto_primes_only_where_run_is_not_a_tmpfs(tmp_path):
    assert kdat_cache.is_tmpfs(kdat_cache.Path("/dev/shm"))
    assert not kdat_cache.wanted("auto", kdat_cache.Path("/dev/shm"))  # CRIU keeps it there itself
    assert kdat_cache.wanted("auto", tmp_path) == (not kdat_cache.is_tmpfs(tmp_path))
    assert kdat_cache.wanted("always", kdat_cache.Path("/dev/shm"))
    assert not kdat_cache.wanted("never", tmp_path)


def test_an_unknown_mode_is_refused():
    with pytest.raises(kdat_cache.KdatError, match="criu_kdat_cache"):
        kdat_cache.wanted("yes")


def test_is_tmpfs_of_a_missing_path_is_false(tmp_path):
    assert not kdat_cache.is_tmpfs(tmp_path / "missing")
