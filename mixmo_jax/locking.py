"""The one trainer of a workdir: the lock it holds while it trains.

    with locking.trainer_lock(workdir):   # WorkdirBusyError if one trains
      ...                                 # locking.lease_lost() in a bucket

Locally the lock is `fcntl.flock` on WORKDIR/.lock (the file name is
`workdir.LOCK`); in a bucket (gs://) it is a lease object renewed while
training (`mixmo_jax.lease`, which says what it protects).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

from mixmo_jax import storage
from mixmo_jax import workdir as wd


class WorkdirBusyError(RuntimeError):
  """Another trainer holds the workdir's lock (one-line message)."""


def _lock_holders(fd: int) -> list[int] | None:
  """The pids holding a flock on the file of `fd`, from /proc/locks (Linux;
  None when they cannot be told: no /proc/locks, or pids of another pid
  namespace shown as 0)."""
  try:
    st = os.fstat(fd)
    with open('/proc/locks') as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  inode = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters carry "->".
  pids = [
      int(parts[4])
      for parts in (line.split() for line in lines)
      if len(parts) >= 6 and '->' not in parts and parts[1] == 'FLOCK' and
      parts[5] == inode and parts[4].isdigit()
  ]
  return pids if pids and 0 not in pids else None


def _describe_process(pid: int) -> str:
  """'pid 1234 (python -m mixmo_jax.main ...)', its command line cut short."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      command = ' '.join(f.read().replace(
          b'\0', b' ').decode(errors='replace').split())
  except OSError:
    return f'pid {pid}'
  return f'pid {pid} ({command[:80]}{"..." if len(command) > 80 else ""})'


def _open_lock(workdir: str) -> int:
  """Opens WORKDIR/.lock for writing, created if absent, never through a
  symlink; every failure is one `WorkdirError` line."""
  target = wd.path(workdir, wd.LOCK)
  try:
    os.makedirs(workdir, exist_ok=True)
    return os.open(target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      why = 'is a symbolic link (never followed: remove it)'
    elif e.errno == errno.EISDIR:
      why = 'is a folder, not the lock file (remove it)'
    else:
      why = f'cannot be opened for writing ({e.strerror or e})'
    where = target if e.errno in (errno.ELOOP,
                                  errno.EISDIR) else (e.filename or target)
    raise wd.WorkdirError(f'{where} {why}; the workdir {workdir} cannot be '
                          'used for training') from None


@contextlib.contextmanager
def trainer_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on WORKDIR/.lock while training.

  In a bucket (gs://) the lock is a lease object renewed while training
  (`mixmo_jax.lease`, which says what it protects); `lease_lost()` turns
  true if another trainer took it over. Locally it is
  `fcntl.flock` on a local file: the kernel releases it when the process
  dies, however it dies, so the file a killed trainer leaves behind is free
  again.  The file is opened with O_NOFOLLOW (a symlink or a folder at .lock
  is refused, never followed or truncated) and holds the trainer's pid, host
  and start time.  Readers (evaluate, predict, analysis) take no lock and
  read while a run trains.

  Raises:
    WorkdirBusyError: another live trainer holds it: the refusal names the
      process that holds it (from /proc/locks), or says it cannot tell.
    WorkdirError: the workdir or its lock file cannot be used.
  """
  if storage.is_url(workdir):
    with _lease(workdir):
      yield
    return
  fd = _open_lock(workdir)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holders = _lock_holders(fd)
    recorded = os.read(fd, 1000).decode(errors='replace').strip()
    os.close(fd)
    who = (', '.join(_describe_process(p) for p in holders)
           if holders else 'the holder cannot be told on this system')
    raise WorkdirBusyError(
        f'{workdir} is in use by another trainer: {who}; its lock file '
        f'says {recorded or "nothing"}; wait for it to finish or stop it, '
        'or train in another --workdir') from None
  try:
    os.ftruncate(fd, 0)
    os.write(
        fd,
        json.dumps({
            'pid': os.getpid(),
            'host': socket.gethostname(),
            'since': time.strftime('%Y-%m-%dT%H:%M:%S')
        }).encode())
  except OSError as e:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    raise wd.cannot_write(wd.path(workdir, wd.LOCK), e) from None
  try:
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


_LEASE_LOST = threading.Event()


def lease_lost() -> bool:
  """Whether this process's lease on its gs:// workdir was taken over (the
  trainer must stop without writing)."""
  return _LEASE_LOST.is_set()


@contextlib.contextmanager
def _lease(workdir: str) -> Iterator[None]:
  from mixmo_jax import lease
  target = wd.path(workdir, wd.LOCK)
  held = lease.Lease(lease.GcsStore(storage.filesystem(target)), target)
  try:
    held.acquire()
  except lease.BusyError as e:
    raise WorkdirBusyError(f'{workdir} is {e}; wait for it to finish or '
                           'stop it, or train in another --workdir') from None
  except Exception as e:
    raise wd.WorkdirError(f'cannot take the lease {target} '
                          f'({storage.store_reason(e)})') from None
  _LEASE_LOST.clear()
  held.on_lost = _LEASE_LOST.set
  held.start_renewing()
  try:
    yield
  finally:
    held.release()
