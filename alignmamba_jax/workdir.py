"""The workdir as a place one run owns: checked before anything is loaded, locked for the run's lifetime, and
written only by whole-file replacement.

- `check_workdir` refuses, in one line, what cannot hold a run: an empty name (an unset shell variable), an
  existing file, a local directory (or the nearest existing parent) this user cannot write to, and a bucket
  URL whose filesystem package is not installed.
- `WorkdirLock` holds an `flock` on WORKDIR/.lock.<process index> while the run lives. The kernel drops it when
  the process dies in any way (kill -9 included), so a stale lock never blocks the next run; the file itself
  stays and means nothing. Each process of a multi-process run locks its own file (all of them may share one
  workdir on a shared file system), and the processes agree: if any of them finds its file locked, every one
  of them stops with the same `UserError` naming the workdir. Bucket workdirs (gs://...) cannot be locked and
  are not. A workdir the run created and left empty (it stopped on a mistake) is removed again.
- `write_atomic` writes a file to a temporary name beside it, flushes it to disk and renames it into place, so
  a reader (or a run killed mid-write, or a full disk) sees the old file or the new one, never half of one.
  Object stores replace an object whole anyway.
- `disk_full_in` finds ENOSPC in an exception's chain (orbax wraps the OSError of a save).
"""
import errno
import fcntl
import os
import tempfile

import numpy as np
from etils import epath

from alignmamba_jax.errors import UserError


def is_local(workdir: str) -> bool:
    return "://" not in workdir


def check_workdir(workdir) -> str:
    """The workdir as the run will use it (absolute if local); a UserError if it cannot hold a run."""
    if workdir is None or not str(workdir).strip():
        raise UserError("--workdir is empty (an unset variable?); give the directory for checkpoints and results")
    workdir = str(workdir)
    if not is_local(workdir):
        try:
            epath.Path(workdir).exists()
        except (ImportError, ModuleNotFoundError) as error:
            raise UserError(f"--workdir={workdir}: cannot open this URL: {error} (install the filesystem package "
                            f"for it, e.g. gcsfs for gs://)") from None
        return workdir
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir} is a file, not a directory")
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--workdir={workdir}: {existing} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and root on special file systems all show here
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(f"--workdir={workdir}: cannot write in {existing}: {error.strerror}") from None
    return workdir


class WorkdirLock:
    """An exclusive `flock` per process on WORKDIR/.lock.<process index>; see the module docstring."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._fd = None

    def acquire(self) -> None:
        import jax  # here, not at the top: `reporting` imports this module and stays light
        held = True
        if is_local(self.workdir):
            os.makedirs(self.workdir, exist_ok=True)
            self._fd = os.open(os.path.join(self.workdir, f".lock.{jax.process_index()}"), os.O_RDWR | os.O_CREAT,
                               0o644)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = False
        if not all_processes_agree(held):
            self.release()
            raise UserError(f"workdir {self.workdir} is in use by another run (it holds the workdir's lock); "
                            f"wait for it to end, or give this run another --workdir")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def remove_if_unused(workdir: str) -> None:
    """Removes a workdir this run created if it holds nothing but lock files (the run stopped before writing),
    so a mistake leaves no trace."""
    try:
        names = os.listdir(workdir)
        if all(name.startswith(".lock.") for name in names):
            for name in names:
                os.remove(os.path.join(workdir, name))
            os.rmdir(workdir)
    except OSError:  # another process removed it first, or wrote into it meanwhile: leave it
        pass


def all_processes_agree(flag: bool) -> bool:
    """True on every process iff `flag` is True on every process (one small all-gather when multi-process)."""
    import jax
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def write_atomic(path, data) -> None:
    """Replaces the file `path` (str or epath) by `data` (str or bytes) in one step; see the module docstring."""
    path = epath.Path(path)
    payload = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(str(path)):
        path.write_bytes(payload)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def disk_full_in(error) -> bool:
    """True if `error` or an exception it was raised from is an OSError with errno ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False
