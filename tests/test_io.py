"""Outputs are written atomically and with the modes a plain open()/mkdir() would give, so a worker
or server running under another account of the same group can read them."""

import stat

import pytest

from onpolicy_core.data import io

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_respect_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(io, "UMASK", umask)
    io.write_json(tmp_path / "a.json", {"x": 1})
    with io.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("1")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    io.write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "f.txt").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
