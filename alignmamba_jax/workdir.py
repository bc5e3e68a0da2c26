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
  are not. A workdir the run created and left empty (it stopped on a mistake) is removed again, by the run
  holding its lock only (`WorkdirLock`); a workdir removed while a run holds it stops the run (`check`).
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
    return check_writable(workdir, "workdir", "directory")


def check_writable(path, flag, kind) -> str:
    """`path` made absolute; a UserError naming `--flag` unless it can be written as a `kind` ("file" or
    "directory"): an existing path of the other kind, a file where a folder on its way should be, or a folder
    this process cannot write in."""
    path = os.path.abspath(path)
    if os.path.exists(path) and os.path.isdir(path) != (kind == "directory"):
        raise UserError(f"--{flag}={path} is a {'directory' if os.path.isdir(path) else 'file'}; expected a {kind}")
    existing = path if kind == "directory" else os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{flag}={path}: {existing} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and root on special file systems all show here
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(f"--{flag}={path}: cannot write in {existing}: {error.strerror}") from None
    return path


class WorkdirLock:
    """An exclusive `flock` per process on WORKDIR/.lock.<process index>; see the module docstring.

    The lock decides creation: only a process that holds its lock judges whether the workdir is new (it did not
    exist before this process made it, and holds nothing but lock files), and only such a process removes
    anything, while it still holds the lock: its own lock file, then the directory if that is empty. A process
    that does not get the lock removes nothing. The file locked is checked to be the one at the path (not one
    another run removed meanwhile), else the lock is taken again.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.created = False
        self._fd = None
        self._path = None

    def acquire(self) -> None:
        import jax  # here, not at the top: `reporting` imports this module and stays light
        held = True
        if is_local(self.workdir):
            self._path = os.path.join(self.workdir, f".lock.{jax.process_index()}")
            held = self._lock_local()
        if not all_processes_agree(held):
            self._close()
            raise UserError(f"workdir {self.workdir} is in use by another run (it holds the workdir's lock); "
                            f"wait for it to end, or give this run another --workdir")

    def _lock_local(self) -> bool:
        for _ in range(100):   # each retry follows a removal by another run: a few at most
            existed = os.path.isdir(self.workdir)
            os.makedirs(self.workdir, exist_ok=True)
            try:
                fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:   # the directory was removed between the two calls
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fd = fd
            if not self._same_file():   # locked a file another run removed before this one locked it
                self._close()
                continue
            self.created = not existed and all(name.startswith(".lock.") for name in os.listdir(self.workdir))
            return True
        raise UserError(f"workdir {self.workdir}: its lock file keeps being removed while this run takes it; "
                        f"another process is deleting the workdir")

    def _same_file(self) -> bool:
        try:
            return os.stat(self._path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def check(self) -> None:
        """Raises a UserError if the locked workdir was removed (or replaced) while the run held it: the run
        stops instead of recreating it, unlocked, by its next write."""
        if self._fd is not None and not self._same_file():
            raise removed_error(self.workdir)

    def release(self) -> None:
        """Removes what `created` allows (see the class docstring), then drops the lock."""
        if self._fd is not None and self.created and self._same_file():
            try:
                if all(name.startswith(".lock.") for name in os.listdir(self.workdir)):
                    os.remove(self._path)
                    os.rmdir(self.workdir)
            except OSError:  # another process's lock file is there, or it wrote into the workdir: leave it
                pass
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def removed_error(workdir: str) -> UserError:
    return UserError(f"workdir {workdir} was removed while this run was using it; stopping (it is not recreated: "
                     f"rerun to start afresh)")


def all_processes_agree(flag: bool) -> bool:
    """True on every process iff `flag` is True on every process (one small all-gather when multi-process)."""
    import jax
    from jax.experimental import multihost_utils
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def write_atomic(path, data, make_parent=True) -> None:
    """Replaces the file `path` (str or epath) by `data` (str or bytes) in one step; see the module docstring.
    `make_parent=False`: a missing directory is a FileNotFoundError (a run's workdir removed under it is not
    made again)."""
    path = epath.Path(path)
    payload = data.encode() if isinstance(data, str) else data
    if make_parent:
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
