"""The workdir: refused when it cannot hold a run, locked while a run lives (and not after a kill -9), removed
only by the run holding its lock (a race loser removes nothing), a removal mid-run noticed, files replaced whole
(a failed write keeps the old file), a torn metrics line tolerated, SIGTERM/SIGINT caught."""
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys

import pytest

from alignmamba_jax import preemption, reporting
from alignmamba_jax import workdir as workdir_lib
from alignmamba_jax.errors import UserError


def test_a_workdir_that_cannot_hold_a_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="--workdir is empty"):
        workdir_lib.check_workdir("")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"--workdir={a_file} is a file"):
        workdir_lib.check_workdir(str(a_file))
    with pytest.raises(UserError, match=f"--workdir={a_file}/run: {a_file} is a file"):
        workdir_lib.check_workdir(str(a_file / "run"))
    with pytest.raises(UserError, match="--workdir=/proc/run: cannot write in /proc"):  # even as root
        workdir_lib.check_workdir("/proc/run")
    assert workdir_lib.check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_a_bucket_workdir_without_its_filesystem_package_is_refused():
    pytest.importorskip("etils.epath")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match="--workdir=gs://a-bucket/run: cannot open this URL: .*gcsfs"):
        workdir_lib.check_workdir("gs://a-bucket/run")


def test_a_locked_workdir_refuses_a_second_holder_until_released(tmp_path):
    with workdir_lib.WorkdirLock(str(tmp_path)):
        with pytest.raises(UserError, match=f"workdir {tmp_path} is in use by another run"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass


def test_the_loser_of_a_race_for_a_new_workdir_removes_nothing_and_a_third_run_is_refused(tmp_path, monkeypatch):
    """Two runs start on a workdir that does not exist yet; the loser's lock call comes only once the winner holds
    the lock (the race that once let the loser delete the winner's lock and workdir)."""
    from alignmamba_jax import train
    workdir = tmp_path / "run"
    winner = workdir_lib.WorkdirLock(str(workdir))
    real_flock = fcntl.flock

    def loser_delayed(fd, operation):
        if winner._fd is None and not getattr(loser_delayed, "winning", False):
            loser_delayed.winning = True
            winner.acquire()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", loser_delayed)
    with pytest.raises(UserError, match=f"^workdir {workdir} is in use by another run"):
        train.train_and_evaluate(train.default_config(), str(workdir))
    monkeypatch.undo()
    assert winner._fd is not None and sorted(os.listdir(workdir)) == [".lock.0"]
    with pytest.raises(UserError, match=f"^workdir {workdir} is in use by another run"):   # a third run
        train.train_and_evaluate(train.default_config(), str(workdir))
    assert sorted(os.listdir(workdir)) == [".lock.0"]
    winner.release()


def test_a_run_that_created_its_workdir_and_stops_on_a_mistake_removes_it(tmp_path):
    lock = workdir_lib.WorkdirLock(str(tmp_path / "new"))
    with lock:
        assert lock.created
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with workdir_lib.WorkdirLock(str(tmp_path / "kept")) as lock:
        assert not lock.created
    assert os.listdir(tmp_path / "kept") == [".lock.0"]


def test_a_workdir_removed_or_replaced_while_locked_stops_the_run(tmp_path):
    workdir = tmp_path / "run"
    for replace in (False, True):
        with workdir_lib.WorkdirLock(str(workdir)) as lock:
            lock.check()
            shutil.rmtree(workdir)
            if replace:   # removed and made again (by another run, or a write that recreated it)
                workdir.mkdir()
                (workdir / ".lock.0").write_text("")
            with pytest.raises(UserError, match=f"^workdir {workdir} was removed while this run was using it; "
                                                f"stopping"):
                lock.check()
        assert workdir.exists() == replace   # the run removes nothing it does not hold


def test_the_lock_of_a_process_killed_with_sigkill_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom alignmamba_jax.workdir import WorkdirLock\n"
         f"WorkdirLock({str(tmp_path)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="is in use by another run"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    workdir_lib.write_atomic(path, "old")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as failure:
        workdir_lib.write_atomic(path, "new and longer")
    assert workdir_lib.disk_full_in(failure.value)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_metric_writer_keeps_every_line_whole_when_the_disk_fills(tmp_path, monkeypatch):
    writer = reporting.MetricWriter(str(tmp_path), active=True)
    writer.write(1, {"train/loss": 1.0})
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        writer.write(2, {"train/loss": 0.5})
    monkeypatch.undo()
    writer.close()
    assert reporting.read_metrics(str(tmp_path)) == [{"step": 1, "train/loss": 1.0}]


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/lo')
    assert reporting.read_metrics(str(tmp_path)) == [{"step": 5, "train/loss": 1.0}]
    writer = reporting.MetricWriter(str(tmp_path), active=True)  # what a resumed run does
    writer.truncate_after(5)
    writer.close()
    assert path.read_text() == '{"step": 5, "train/loss": 1.0}\n'
    path.write_text('{"step": 5, "train/lo\n{"step": 10, "train/loss": 1.0}\n')
    with pytest.raises(UserError, match=f"{path}:1: not a JSON record"):
        reporting.read_metrics(str(tmp_path))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_the_loop_to_stop_and_the_handlers_are_restored(signum):
    before = signal.getsignal(signum)
    with preemption.StopSignals() as signals:
        assert not signals.stop_requested(1)
        os.kill(os.getpid(), signum)
        assert signals.stop_requested(2) and signals.signum == signum
    assert signal.getsignal(signum) is before
    assert str(preemption.Preempted(signum, "w/checkpoints/2")).startswith(
        f"stopped by {signal.Signals(signum).name}; saved checkpoint w/checkpoints/2")
