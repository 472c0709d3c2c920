"""One trainer per workdir on an object store: a lease object.

A bucket has no `flock`. There WORKDIR/.lock is a lease, a JSON object
{owner, pid, host, since, expires}, kept by three conditional requests that
the store applies atomically (GCS: `ifGenerationMatch`):

  acquire  read it: if it exists and has not expired, the workdir is busy
           (the refusal names the holder); if it expired (its holder
           stopped renewing it TTL seconds ago: dead, preempted or hung;
           or its holder was a process of this machine, same boot and pid
           namespace, that is gone),
           delete it only if it is still the generation that was read.
           Then create it only if it does not exist. Who loses either race
           is refused as busy.
  renew    a daemon thread replaces it every TTL / 4 with a later expiry,
           only if it is still the generation this trainer wrote. If not,
           the lease was taken over: `Lease.lost` says so, with an error
           in the log.
  release  delete it, only if it is still this trainer's generation.

Protected: two trainers started on one workdir, on any machines, while the
first is alive (the second is refused); a preempted trainer's workdir is
free again TTL seconds after its last renewal, a crashed one's at once on
its own machine. Not protected: a trainer
frozen for longer than TTL (e.g. a stopped process) is taken over and, when
it wakes, may write alongside the new one until its next renewal finds the
lease gone (the loop stops at its next step then). Clocks of the machines
must agree within a fraction of TTL (expiry times are wall-clock times).
"""
import json
import os
import socket
import threading
import time
from typing import Protocol
import uuid

from absl import logging

TTL_S = 120.0  # A dead trainer's workdir is free after this long.


class Store(Protocol):
  """Conditional object operations (generation: an int that changes at
  every write of the object)."""

  def create(self, path: str, data: bytes) -> int | None:
    """Writes `data` only if no object is at `path`: its generation, or
    None when one exists."""

  def read(self, path: str) -> tuple[bytes, int] | None:
    """(content, generation), or None when there is no object."""

  def replace(self, path: str, data: bytes, generation: int) -> int | None:
    """Writes `data` only if the object's generation is `generation`: the
    new generation, or None when it is not (or gone)."""

  def delete(self, path: str, generation: int) -> bool:
    """Deletes the object only if its generation is `generation`."""


class GcsStore:
  """`Store` on Google Cloud Storage's JSON API, through gcsfs (which
  honours STORAGE_EMULATOR_HOST)."""

  def __init__(self, fs):
    self.fs = fs

  def _upload(self, path: str, data: bytes, generation: int) -> int | None:
    from urllib.parse import quote
    bucket, key, _ = self.fs.split_path(path)
    try:
      out = self.fs.call(
          'POST', f'{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o',
          uploadType='media', name=key, ifGenerationMatch=str(generation),
          data=data, json_out=True)
    except FileExistsError:  # HTTP 412: the precondition failed.
      return None
    return int(out['generation'])

  def create(self, path, data):
    return self._upload(path, data, 0)

  def read(self, path):
    bucket, key, _ = self.fs.split_path(path)
    try:
      meta = self.fs.call('GET', 'b/{}/o/{}', bucket, key, json_out=True)
      generation = int(meta['generation'])
      _, content = self.fs.call('GET', 'b/{}/o/{}', bucket, key, alt='media',
                                generation=str(generation))
    except FileNotFoundError:
      return None
    return content, generation

  def replace(self, path, data, generation):
    return self._upload(path, data, generation)

  def delete(self, path, generation):
    bucket, key, _ = self.fs.split_path(path)
    try:
      self.fs.call('DELETE', 'b/{}/o/{}', bucket, key,
                   ifGenerationMatch=str(generation))
    except (FileExistsError, FileNotFoundError):
      return False
    return True


class BusyError(RuntimeError):
  """Another trainer holds an unexpired lease (one-line message)."""


def _describe(content: bytes) -> str:
  try:
    held = json.loads(content.decode())
    until = time.strftime('%H:%M:%S', time.gmtime(float(held['expires'])))
    return (f'pid {held["pid"]} on {held["host"]} since {held["since"]}, '
            f'lease renewed until {until} UTC')
  except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
          OSError):
    return 'a lease this version cannot read'


def machine_id() -> str | None:
  """This boot of this machine and this pid namespace: where a pid names
  the same process (None where /proc cannot tell). A host name alone does
  not: containers on several machines may share one."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      boot = f.read().strip()
    return f'{boot}:{os.stat("/proc/self/ns/pid").st_ino}'
  except OSError:
    return None


def _expired(content: bytes, now: float) -> bool:
  """Whether a lease holds nothing any more: past its expiry, held by a
  process of this machine (`machine_id`) that is gone (a crash here need
  not wait for the expiry), or not a lease at all."""
  try:
    held = json.loads(content.decode())
    if not float(held['expires']) >= now:  # NaN counts as expired too.
      return True
    here = machine_id()
    pid = int(held['pid'])
    return (here is not None and held.get('machine') == here and pid > 0 and
            not _alive(pid))
  except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
    return True  # Garbage holds nothing.


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # Alive, another user's.
    return True
  return True


class Lease:
  """The lease on `path` in `store` (see the module doc)."""

  def __init__(self, store: Store, path: str, ttl_s: float = TTL_S,
               clock=time.time):
    self.store, self.path, self.ttl_s, self.clock = store, path, ttl_s, clock
    self.owner = uuid.uuid4().hex
    self.since = time.strftime('%Y-%m-%dT%H:%M:%S')
    self.generation: int | None = None
    self.lost = False
    self.on_lost = lambda: None  # Called once, from the renewing thread.
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _content(self) -> bytes:
    return json.dumps({
        'owner': self.owner,
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'machine': machine_id(),
        'since': self.since,
        'expires': self.clock() + self.ttl_s
    }).encode()

  def acquire(self) -> None:
    """Takes the lease or raises `BusyError`.

    The lease is read first, then created only if absent: a store that
    checks no precondition (an emulator) still refuses a second trainer
    started after the first; the conditional create decides a race.
    """
    held = self.store.read(self.path)
    if held is not None:
      if not _expired(held[0], self.clock()):
        raise BusyError(f'in use by another trainer: {_describe(held[0])}')
      if not self.store.delete(self.path, held[1]):
        raise BusyError('in use by another trainer, which took the expired '
                        'lease first')
      logging.warning('Took over the expired lease %s (%s).', self.path,
                      _describe(held[0]))
    generation = self.store.create(self.path, self._content())
    if generation is None:
      raise BusyError('in use by another trainer, which took the lease '
                      'first')
    self.generation = generation

  def renew(self) -> bool:
    """Extends the lease; False (and `lost`) when it was taken over."""
    if self.generation is None:
      raise RuntimeError('renew() before acquire()')
    generation = self.store.replace(self.path, self._content(), self.generation)
    if generation is None:
      if not self.lost:
        logging.error(
            'The lease %s was taken over by another trainer: this '
            'one stops.', self.path)
        self.lost = True
        self.on_lost()
      return False
    self.generation = generation
    return True

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if not self.lost and self.generation is not None:
      self.store.delete(self.path, self.generation)

  def start_renewing(self) -> None:
    """Renews every TTL / 4 on a daemon thread until `release`."""

    def loop():
      while not self._stop.wait(self.ttl_s / 4):
        try:
          if not self.renew():
            return
        except Exception as e:
          logging.warning('Could not renew the lease %s (%s); retrying.',
                          self.path, e)

    self._thread = threading.Thread(target=loop, name='lease', daemon=True)
    self._thread.start()
