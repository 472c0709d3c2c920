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
from typing import Any, Dict, Mapping, Optional

from absl import logging
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary

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
  return (length + struct.pack('<I', masked_crc32c(length)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _metadata(plugin: str, data_class) -> summary_pb2.SummaryMetadata:
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
      data_class=data_class)


def scalar_value(tag: str, value: float) -> summary_pb2.Summary.Value:
  """A scalar as TF2's `tf.summary.scalar` writes it: a float32 [] tensor."""
  tensor = tensor_pb2.TensorProto(
      dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
      float_val=[float(value)])
  return summary_pb2.Summary.Value(
      tag=tag, tensor=tensor,
      metadata=_metadata('scalars', summary_pb2.DATA_CLASS_SCALAR))


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 [H, W, 3] (or [H, W]) array as PNG."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
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
      dtype=types_pb2.DT_STRING,
      tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(blobs))]),
      string_val=blobs)
  return summary_pb2.Summary.Value(
      tag=tag, tensor=tensor,
      metadata=_metadata('images', summary_pb2.DATA_CLASS_BLOB_SEQUENCE))


class EventWriter:
  """Appends TensorBoard events to one new event file under `logdir`.

  The file is created at the first write (a run that fails before it
  leaves no file). `logdir=None` writes nothing (processes > 0).
  """

  def __init__(self, logdir: Optional[str]):
    self.logdir = logdir
    self.path: Optional[str] = None
    self._file = None
    self._failed = logdir is None

  def _write(self, event: event_pb2.Event) -> None:
    if self._failed:
      return
    try:
      if self._file is None:
        os.makedirs(self.logdir, exist_ok=True)
        self.path = os.path.join(
            self.logdir, f'events.out.tfevents.{int(time.time())}.'
            f'{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBER)}')
        self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with
        self._file.write(record(event_pb2.Event(
            wall_time=time.time(),
            file_version='brain.Event:2').SerializeToString()))
      self._file.write(record(event.SerializeToString()))
      self._file.flush()  # a kill loses no written event
    except OSError as e:
      self._failed = True
      logging.warning('TensorBoard event file %s: %s; no more TensorBoard '
                      'events are written this run (checkpoints and '
                      'eval_history.jsonl are unaffected).', self.path, e)

  def write_summary(self, step: int, values) -> None:
    """One Event at `step` holding the Summary.Value protos `values`."""
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """{tag: number} at `step`."""
    if scalars:
      self.write_summary(step, [scalar_value(k, float(v))
                                for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """{tag: uint8 [N, H, W, C]} at `step`."""
    if images and not self._failed:
      self.write_summary(step, [image_value(k, v) for k, v in images.items()])

  def write_hparams(self, hparams: Dict[str, Any]) -> None:
    """{name: bool, int, float or str} for TensorBoard's HParams tab."""
    summary = hparams_summary.hparams_pb(hparams)
    self._write(event_pb2.Event(wall_time=time.time(), step=0,
                                summary=summary))

  def flush(self) -> None:
    """Nothing to do: every write is flushed (clu's interface)."""

  def close(self) -> None:
    if self._file is not None:
      try:
        self._file.close()
      except OSError:
        pass
      self._file = None
