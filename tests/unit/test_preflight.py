"""Preflight checks of the run directory (before any rank writes)."""

import os
import shutil

import pytest

from desmoe.config import ConfigError
from desmoe.rundir import check_output_dir


def test_room_for_a_checkpoint_is_checked_on_the_real_file_system(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_output_dir(str(tmp_path / "run"), need=1024)
    with pytest.raises(ConfigError) as e:
        check_output_dir(str(tmp_path / "run" / "deeper"), need=free + 2**40)
    assert "MiB free; one checkpoint needs about" in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as e:
            check_output_dir(str(locked / "run"), need=1)
        assert "not writable" in str(e.value)
    finally:
        locked.chmod(0o700)


def test_a_file_in_the_way_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError):
        check_output_dir(str(f / "run"), need=1)
