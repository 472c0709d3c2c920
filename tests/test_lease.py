"""mixmo_jax/lease.py: one trainer per gs:// workdir.

The protocol runs against `MemoryStore`, an in-memory store that applies
the conditional requests atomically as GCS does (fake-gcs-server does not
check generations), with a clock the tests move; many threads contend for
one lease. test_gcs.py runs the same lease against the emulator.
"""
import json
import threading

import pytest

from mixmo_jax import lease


class MemoryStore:
  """Objects with generations; create / replace / delete conditional."""

  def __init__(self):
    self.objects = {}
    self.generations = 0
    self.mutex = threading.Lock()

  def _next(self):
    self.generations += 1
    return self.generations

  def create(self, path, data):
    with self.mutex:
      if path in self.objects:
        return None
      self.objects[path] = (data, self._next())
      return self.objects[path][1]

  def read(self, path):
    with self.mutex:
      return self.objects.get(path)

  def replace(self, path, data, generation):
    with self.mutex:
      if self.objects.get(path, (None, None))[1] != generation:
        return None
      self.objects[path] = (data, self._next())
      return self.objects[path][1]

  def delete(self, path, generation):
    with self.mutex:
      if self.objects.get(path, (None, None))[1] != generation:
        return False
      del self.objects[path]
      return True


class Clock:

  def __init__(self):
    self.now = 1_000_000.0

  def __call__(self):
    return self.now


def test_a_live_lease_refuses_a_second_trainer_and_is_released():
  store, clock = MemoryStore(), Clock()
  first = lease.Lease(store, 'b/run/.lock', ttl_s=100, clock=clock)
  first.acquire()
  second = lease.Lease(store, 'b/run/.lock', ttl_s=100, clock=clock)
  clock.now += 99  # Not expired yet.
  with pytest.raises(lease.BusyError, match='in use by another trainer: pid'):
    second.acquire()
  assert first.renew()  # Renewing moves the expiry on.
  clock.now += 99
  with pytest.raises(lease.BusyError):
    second.acquire()
  first.release()
  assert store.objects == {}
  second.acquire()
  held = json.loads(store.read('b/run/.lock')[0])
  assert held['owner'] == second.owner
  assert held['expires'] == clock.now + 100


def test_an_expired_lease_is_taken_over_once_and_its_holder_learns_it():
  store, clock = MemoryStore(), Clock()
  stalled = lease.Lease(store, 'l', ttl_s=100, clock=clock)
  stalled.acquire()
  lost = []
  stalled.on_lost = lambda: lost.append(True)
  clock.now += 101  # It did not renew in time.
  new = lease.Lease(store, 'l', ttl_s=100, clock=clock)
  new.acquire()
  assert json.loads(store.read('l')[0])['owner'] == new.owner
  assert not stalled.renew() and stalled.lost and lost == [True]
  assert not stalled.renew() and lost == [True]  # Said once.
  stalled.release()  # Deletes nothing of the new holder's.
  assert json.loads(store.read('l')[0])['owner'] == new.owner


def test_garbage_at_the_lease_is_taken_over():
  store, clock = MemoryStore(), Clock()
  store.create('l', b'not json')
  taker = lease.Lease(store, 'l', clock=clock)
  taker.acquire()
  assert json.loads(store.read('l')[0])['owner'] == taker.owner


@pytest.mark.parametrize('expired', [False, True])
def test_many_contenders_one_holder(expired):
  """16 threads start at once, on a free workdir or on an expired lease:
  exactly one holds it, every other is refused."""
  store, clock = MemoryStore(), Clock()
  if expired:
    lease.Lease(store, 'l', ttl_s=10, clock=clock).acquire()
    clock.now += 11
  contenders = [
      lease.Lease(store, 'l', ttl_s=10, clock=clock) for _ in range(16)
  ]
  barrier = threading.Barrier(len(contenders))
  outcome = {}

  def contend(i):
    barrier.wait()
    try:
      contenders[i].acquire()
      outcome[i] = 'held'
    except lease.BusyError:
      outcome[i] = 'busy'

  threads = [
      threading.Thread(target=contend, args=(i,))
      for i in range(len(contenders))
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  held = [i for i, o in outcome.items() if o == 'held']
  assert len(held) == 1 and len(outcome) == 16
  assert json.loads(store.read('l')[0])['owner'] == contenders[held[0]].owner


def test_the_renewing_thread_keeps_it_and_stops_on_release():
  store = MemoryStore()
  held = lease.Lease(store, 'l', ttl_s=0.08)
  held.acquire()
  first = store.read('l')[1]
  held.start_renewing()
  threading.Event().wait(0.2)  # Several renewals (every ttl / 4).
  assert store.read('l')[1] > first + 2
  held.release()
  assert store.read('l') is None and not held.lost


def test_a_dead_process_of_this_machine_holds_nothing():
  """A lease of this host whose pid is gone (a real process that exited) is
  taken over at once; a live one's is not, nor another host's."""
  import os
  import socket
  import subprocess
  import sys
  gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  dead_pid = int(gone.stdout)
  clock = Clock()

  def held_by(pid, machine):
    store = MemoryStore()
    store.create(
        'l',
        json.dumps({
            'owner': 'x',
            'pid': pid,
            'host': socket.gethostname(),
            'machine': machine,
            'since': 's',
            'expires': clock.now + 100
        }).encode())
    return store

  here = lease.machine_id()
  assert here
  lease.Lease(held_by(dead_pid, here), 'l', clock=clock).acquire()
  # Alive here; or a pid of another machine (or pid namespace) with the
  # same host name; or no machine recorded; or a pid that names no process.
  for pid, machine in ((os.getpid(), here), (dead_pid, here + '-other'),
                       (dead_pid, None), (-1, here), (0, here)):
    with pytest.raises(lease.BusyError):
      lease.Lease(held_by(pid, machine), 'l', clock=clock).acquire()
