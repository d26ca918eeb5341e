"""Run folders: ownership check, the advisory lock across processes, atomic writes under faults."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hiervision import runfolder
from hiervision.runfolder import (
    MARKER,
    RunFolderError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_run_dir,
    claim_run_dir,
    is_run_dir,
    set_aside,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _child(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_absent_and_empty_folders_are_claimed_and_marked(tmp_path):
    for out in (tmp_path / "new" / "run", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with claim_run_dir(out) as got:
            assert got == out and (out / MARKER).is_file()
        assert is_run_dir(out)
        with claim_run_dir(out):  # a run folder is claimed again (resume)
            pass


def test_a_users_folder_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("my: own")
    with pytest.raises(RunFolderError, match=r"not a hiervision run \(holds config.yaml, notes.txt\).*--force"):
        with claim_run_dir(tmp_path):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]  # nothing created
    with claim_run_dir(tmp_path, force=True):
        assert (tmp_path / MARKER).is_file()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        check_run_dir(f, force=True)


def test_runs_written_before_the_marker_are_recognised(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert not is_run_dir(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"x")
    assert is_run_dir(tmp_path)
    check_run_dir(tmp_path)


def test_second_process_is_blocked_by_the_lock_and_a_crash_releases_it(tmp_path):
    out = tmp_path / "run"
    holder = _child(f"""
        import sys, time
        from hiervision.runfolder import claim_run_dir
        with claim_run_dir({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=rf"{out}: another hiervision process \(pid {holder.pid}\) is writing"):
            with claim_run_dir(out):
                pass
        # a second *process* too (not only a second open file in this one)
        other = _child(f"""
            from hiervision.runfolder import claim_run_dir
            with claim_run_dir({str(out)!r}):
                pass
        """)
        _, err = other.communicate(timeout=60)
        assert other.returncode == 1 and "another hiervision process" in err
    finally:
        holder.kill()  # a crash: the kernel drops the lock, no stale lock file blocks the next run
        holder.wait()
    with claim_run_dir(out):
        pass


def test_failed_write_keeps_the_old_file(tmp_path):
    f = tmp_path / "metrics.json"
    atomic_write_json(f, {"old": 1})

    def disk_full(fh):
        fh.write(b'{"new"')
        raise OSError(errno.ENOSPC, "No space left on device")

    msg = r"metrics.json: cannot write \(disk full\) \(the previous file is unchanged\)"
    with pytest.raises(RunFolderError, match=msg):
        atomic_write(f, disk_full)
    assert f.read_text() == '{\n  "old": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temp file left behind


def test_enospc_at_fsync_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "config.yaml"
    atomic_write_text(f, "old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "fsync", fsync)
    with pytest.raises(RunFolderError, match="disk full"):
        atomic_write_text(f, "new" * 1000)
    monkeypatch.undo()
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_real_file_size_limit_keeps_the_old_file(tmp_path):
    """A genuine write failure from the kernel (RLIMIT_FSIZE → EFBIG), not a monkeypatch."""
    f = tmp_path / "best.pt"
    atomic_write_bytes(f, b"old weights")
    child = _child(f"""
        import resource, signal
        from hiervision.runfolder import RunFolderError, atomic_write_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write_bytes({str(f)!r}, b"x" * 100_000)
        except RunFolderError as e:
            print(e)
    """)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip().startswith(f"{f}: cannot write (") and "previous file is unchanged" in out
    assert f.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_read_only_folder_is_one_line(tmp_path, monkeypatch):
    f = tmp_path / "taxonomy.json"

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runfolder, "open", read_only, raising=False)
    with pytest.raises(RunFolderError, match=r"taxonomy.json: cannot write \(folder is read-only\)$"):
        atomic_write_text(f, "x")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_by_permissions(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "a.txt").write_text("old")
    ro.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match="permission denied"):
            atomic_write_text(ro / "a.txt", "new")
        assert (ro / "a.txt").read_text() == "old"
    finally:
        ro.chmod(0o755)


def test_set_aside_moves_instead_of_deleting(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"1")
    (tmp_path / "metrics.json").write_text("{}")
    assert set_aside(tmp_path) == ["best.pt", "metrics.json"]
    assert (tmp_path / "previous" / "best.pt").read_bytes() == b"1"
    assert not (tmp_path / "best.pt").exists()
    assert set_aside(tmp_path) == []
