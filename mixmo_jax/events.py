"""TensorBoard event files, written without TensorFlow (the one writer).

Importing TensorFlow costs about 8 s of CPU per process on a 2-core machine
(clu's `SummaryWriter` does, through `tf.summary`), most of a short run's
start-up. The event-file format is small, so it is written here with
TensorBoard's protocol buffers only (`tensorboard.compat.proto`, no
TensorFlow import):

  file    events.out.tfevents.<unix time>.<host>.<pid>.<n> in the logdir,
          a sequence of records, the first an Event with
          file_version 'brain.Event:2';
  record  uint64 length (little-endian) | uint32 masked CRC-32C of the
          length | the serialized Event | uint32 masked CRC-32C of it,
          where masked(c) = ((c >> 15 | c << 17) + 0xa282ead8) mod 2**32
          (the TFRecord framing);
  values  what `tf.summary` (TF2) writes, so TensorBoard shows them alike:
          a scalar is a float32 tensor with the 'scalars' plugin, an image
          a string tensor [width, height, PNG bytes] with the 'images'
          plugin, the hparams the HParams plugin's session-start summary.

`EventWriter` has the methods of clu's `MetricWriter` that `progress`
uses (write_scalars, write_images, write_hparams, flush, close). A failed
write (a full disk) is logged once and ends the event file; training and
checkpoints go on.
"""
import io
import itertools
import os
import socket
import struct
import time
from typing import (Any, BinaryIO)
from collections.abc import Iterator, Mapping

from absl import logging
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary

from mixmo_jax import storage

_CRC32C_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected.
# <n> of the file names: two writers of one process never share a file.
_FILE_NUMBER = itertools.count()


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (crc32c(b'123456789') == 0xE3069283)."""
  crc = 0xFFFFFFFF
  table = _TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: the CRC-32C rotated right by 15, plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data +
          struct.pack('<I', masked_crc32c(data)))


def read_records(data: bytes) -> Iterator[bytes]:
  """The payloads of the complete, intact records of an event file's bytes
  (a record cut short by a kill, or failing its CRCs, ends the reading)."""
  offset = 0
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack('<Q', header)
    (length_crc,) = struct.unpack('<I', data[offset + 8:offset + 12])
    end = offset + 12 + length + 4
    if length_crc != masked_crc32c(header) or end > len(data):
      return
    payload = data[offset + 12:end - 4]
    if struct.unpack('<I', data[end - 4:end])[0] != masked_crc32c(payload):
      return
    yield payload
    offset = end


def read_scalars(logdir: str, tags) -> dict[str, tuple[list[int], list[float]]]:
  """{tag: ([step], [value])} of the scalars `tags` in the event files of
  `logdir` (local or gs://), files in name order."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  names = sorted(
      n for n in storage.listdir(logdir)
      if n.startswith('events.out.tfevents.'))
  for name in names:
    for payload in read_records(storage.read_bytes(storage.join(logdir, name))):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.tag in tags and value.HasField('tensor'):
          steps, values = out.setdefault(value.tag, ([], []))
          steps.append(int(event.step))
          tensor = value.tensor
          values.append(
              float(tensor.float_val[0]) if tensor.float_val else float(
                  np.frombuffer(tensor.tensor_content, '<f4')[0]))
  return out


def _metadata(plugin: str, data_class) -> summary_pb2.SummaryMetadata:
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
      data_class=data_class)


def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  """A scalar as TF2's `tf.summary.scalar` writes it: a float32 [] tensor."""
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_FLOAT,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(),
      float_val=[float(value)])
  return summary_pb2.Summary.Value(
      tag=tag, tensor=tensor, metadata=_metadata('scalars',
                                                 summary_pb2.DATA_CLASS_SCALAR))


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 [H, W, 3] (or [H, W]) array as PNG."""
  from PIL import Image
  out = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(out, format='PNG')
  return out.getvalue()


def image_value(tag: str, images: np.ndarray) -> summary_pb2.Summary.Value:
  """uint8 [N, H, W, C] (or [H, W, C]) images as TF2's `tf.summary.image`
  writes them: a string tensor [width, height, PNG of each image]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  height, width = images.shape[1:3]
  blobs = [str(width).encode(), str(height).encode()]
  blobs += [png_bytes(image) for image in images]
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(blobs))]),
      string_val=blobs)
  return summary_pb2.Summary.Value(
      tag=tag, tensor=tensor,
      metadata=_metadata('images', summary_pb2.DATA_CLASS_BLOB_SEQUENCE))


class EventWriter:
  """Appends TensorBoard events to one new event file under `logdir`.

  The file is created at the first write (a run that fails before it
  leaves no file). `logdir=None` writes nothing (processes > 0). Locally
  every event is flushed at once; in a bucket (gs://, where objects cannot
  grow) the whole file is written again at most every UPLOAD_EVERY_S
  seconds and at `close`, so a kill loses at most that much of the curves.
  """
  UPLOAD_EVERY_S = 30.0

  def __init__(self, logdir: str | None):
    self.logdir = logdir
    self.path: str | None = None
    self._file: BinaryIO | None = None
    self._failed = logdir is None
    self._remote = logdir is not None and storage.is_url(logdir)
    self._content = bytearray()  # In a bucket: the whole file so far.
    self._uploaded = 0.0

  def _write(self, event: event_pb2.Event) -> None:
    if self._failed:
      return
    assert self.logdir is not None  # Else _failed from the start.
    try:
      if self.path is None:
        storage.makedirs(self.logdir)
        self.path = storage.join(
            self.logdir, f'events.out.tfevents.{int(time.time())}.'
            f'{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBER)}')
        if not self._remote:
          self._file = open(self.path, 'ab')
        self._append(
            record(
                event_pb2.Event(
                    wall_time=time.time(),
                    file_version='brain.Event:2').SerializeToString()))
      self._append(record(event.SerializeToString()))
    except OSError as e:
      self._failed = True
      logging.warning(
          'TensorBoard event file %s: %s; no more TensorBoard '
          'events are written this run (checkpoints and '
          'eval_history.jsonl are unaffected).', self.path, e)

  def _append(self, data: bytes) -> None:
    if not self._remote:
      assert self._file is not None  # Opened by the first write.
      self._file.write(data)
      self._file.flush()  # A kill loses no written event.
      return
    self._content += data
    if time.time() - self._uploaded >= self.UPLOAD_EVERY_S:
      self._upload()

  def _upload(self) -> None:
    assert self.path is not None  # Set by the first write.
    storage.write_bytes(self.path, bytes(self._content))
    self._uploaded = time.time()

  def write_summary(self, step: int, values) -> None:
    """One Event at `step` holding the Summary.Value protos `values`."""
    self._write(
        event_pb2.Event(wall_time=time.time(), step=int(step),
                        summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """{tag: number} at `step`."""
    if scalars:
      self.write_summary(
          step, [scalar_value(k, float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """{tag: uint8 [N, H, W, C]} at `step`."""
    if images and not self._failed:
      self.write_summary(step, [image_value(k, v) for k, v in images.items()])

  def write_hparams(self, hparams: dict[str, Any]) -> None:
    """{name: bool, int, float or str} for TensorBoard's HParams tab."""
    summary = hparams_summary.hparams_pb(hparams)
    self._write(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

  def flush(self) -> None:
    """Nothing to do: every write is flushed (clu's interface)."""

  def close(self, upload: bool = True) -> None:
    """Closes the file; in a bucket, first uploads what the last upload
    missed, unless `upload` is False (the workdir is another trainer's)."""
    if (upload and self._remote and self.path is not None and not self._failed):
      try:
        self._upload()
      except OSError as e:
        logging.warning('TensorBoard event file %s: %s', self.path, e)
    if self._file is not None:
      try:
        self._file.close()
      except OSError:
        pass
      self._file = None
