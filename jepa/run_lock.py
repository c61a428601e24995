"""One training run per output folder: the main process holds ``<trainer.output_dir>/run.lock`` for the run.

The lock is an ``fcntl.flock`` on that file, which records its holder (pid, host, start time). The kernel drops a
flock when its process dies, so a run killed with ``kill -9`` never blocks the next one: the next run takes the
file over and logs who left it. A second run while the first is alive stops with ``RunLockError`` naming the other
run's pid, host and start time and the lock path. On a filesystem without flock support the recorded holder
decides instead: a lock of this host whose pid is gone (or now another process) is stale and taken over with a
warning; any other lock stops the run (remove the file by hand once sure that run is over).
Only the main process takes the lock; the other processes receive its outcome (one broadcast) and raise alike.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunLockError(RuntimeError):
    """Another run holds the output folder's lock; the message names it and the lock path."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22); tells a reused pid
    apart. None where /proc is absent or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def holder_record() -> dict:
    """Who holds the lock: written into the lock file."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "process_start": _process_start(os.getpid()), "boot_id": _boot_id()}


def read_record(lock: Path) -> dict | None:
    """The lock file's holder record; None when it is empty or unreadable (e.g. being written right now)."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def is_stale(record: dict) -> bool:
    """True only when the holder is certainly gone: same host, and a reboot since, or its pid is not alive, or the
    pid now belongs to a process started at another time. A lock of another host is never judged stale."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if record.get("boot_id") and _boot_id() and record["boot_id"] != _boot_id():
        return True
    if not _pid_alive(record["pid"]):
        return True
    start = _process_start(record["pid"])
    return bool(record.get("process_start") and start and start != record["process_start"])


def describe(record: dict | None) -> str:
    if record is None:
        return "another run (its details are not written yet or unreadable)"
    return f"another run (pid {record.get('pid')} on host '{record.get('host')}', started {record.get('started')})"


def _held_error(lock: Path, record: dict | None) -> RunLockError:
    return RunLockError(
        f"trainer.output_dir '{lock.parent}' is in use by {describe(record)}; lock file '{lock}'. Two runs on one "
        f"folder would overwrite each other's checkpoints: wait for that run to end, stop it, or choose another "
        f"trainer.output_dir. If that run is certainly over (e.g. it ran on another machine and was killed), "
        f"delete '{lock}' by hand.")


def _open_locked(lock: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock`` (the path still names the locked file), None when another
    process holds it. Raises OSError where the filesystem has no flock."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the previous holder unlinked it between our open and flock
            same = False
        if same:
            return fd
        os.close(fd)


def _write_record(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder_record()).encode())
    os.fsync(fd)


def _warn_taken_over(lock: Path, record: dict | None) -> None:
    if record is not None:  # we hold the flock, so whoever wrote this is gone
        logger.warning("took over the lock '%s' left by a run that is no longer running (pid %s on host '%s', "
                       "started %s); it was killed or crashed", lock, record.get("pid"), record.get("host"),
                       record.get("started"))


def acquire(output_dir: str | Path) -> tuple[Path, int | None]:
    """Take ``<output_dir>/run.lock`` (creating the folder); returns (lock path, fd or None without flock).
    Raises RunLockError naming the holder when another live run has it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = output_dir / LOCK_NAME
    try:
        fd = _open_locked(lock)
    except OSError as err:  # no flock on this filesystem: judge by the recorded holder
        logger.warning("'%s': the filesystem does not support flock (%s); judging the lock by its recorded pid",
                       lock, err)
        return _acquire_by_record(lock), None
    if fd is None:
        raise _held_error(lock, read_record(lock))
    _warn_taken_over(lock, read_record(lock))
    _write_record(fd)
    return lock, fd


def _acquire_by_record(lock: Path) -> Path:
    """The fallback without flock: exclusive creation; a stale record (``is_stale``) is replaced once."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            record = read_record(lock)
            if record is None or not is_stale(record):
                raise _held_error(lock, record) from None
            _warn_taken_over(lock, record)
            lock.unlink(missing_ok=True)
            continue
        _write_record(fd)
        os.close(fd)
        return lock
    raise _held_error(lock, read_record(lock))


def release(lock: Path, fd: int | None) -> None:
    """Remove the lock file (while still holding the flock), then drop the flock."""
    record = read_record(lock) if fd is None else None
    if record is not None and record.get("pid") != os.getpid():
        return  # without flock: never remove a lock that another run has taken over
    lock.unlink(missing_ok=True)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def run_lock(output_dir: str | Path, accelerator=None):
    """Hold the output folder's lock for the ``with`` body on the main process (released on any exit, exceptions
    included); every process raises RunLockError when the main process could not take it."""
    from accelerate.utils import broadcast_object_list

    main = accelerator is None or accelerator.is_main_process
    held, error, message = None, None, None
    if main:
        try:
            held = acquire(output_dir)
        except Exception as err:  # every process must hear of it, or the others would wait at the next barrier
            error, message = err, str(err)
    if accelerator is not None and accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if error is not None:
        raise error
    if message is not None:
        raise RunLockError(message)
    try:
        yield
    finally:
        if held is not None:
            release(*held)
