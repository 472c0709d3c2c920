"""`events`: TensorBoard event files without TensorFlow, read back by
TensorFlow's own record reader (which checks every CRC)."""
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from mixmo_jax import events


def _read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def _read(path):
  import tensorflow as tf
  return list(tf.compat.v1.train.summary_iterator(path))


def test_crc32c_check_value_and_not_plain_crc32():
  # The CRC-32C check value of the standard test string.
  assert events.crc32c(b'123456789') == 0xE3069283
  assert events.crc32c(b'') == 0
  assert events.crc32c(b'123456789') != zlib.crc32(b'123456789')


def test_record_framing():
  data = b'mixmo'
  rec = events.record(data)
  assert len(rec) == 8 + 4 + len(data) + 4
  assert int.from_bytes(rec[:8], 'little') == len(data)
  assert rec[12:17] == data
  crc = events.crc32c(data)
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  assert int.from_bytes(rec[-4:], 'little') == (rotated + 0xA282EAD8) % 2**32


def test_tensorflow_reads_scalars_images_hparams(tmp_path):
  import tensorflow as tf
  writer = events.EventWriter(str(tmp_path))
  writer.write_hparams({
      'optimizer.base_learning_rate': 0.1,
      'model.depth': 10,
      'mixing.method': 'cut_mixmo',
      'flag': True
  })
  writer.write_scalars(7, {'train/loss': 1.25, 'eval/top1': np.float32(0.5)})
  image = np.zeros((1, 6, 4, 3), np.uint8)
  image[0, 1, 2] = (255, 0, 9)  # a planted pixel
  writer.write_images(7, {'eval/figure': image})
  writer.close()
  read = _read(writer.path)
  assert read[0].file_version == 'brain.Event:2'
  values = {v.tag: (e.step, v) for e in read[1:] for v in e.summary.value}
  assert values['train/loss'][0] == 7
  assert float(tf.make_ndarray(values['train/loss'][1].tensor)) == 1.25
  assert float(tf.make_ndarray(values['eval/top1'][1].tensor)) == 0.5
  assert (values['train/loss'][1].metadata.plugin_data.plugin_name == 'scalars')
  step, figure = values['eval/figure']
  assert step == 7 and figure.metadata.plugin_data.plugin_name == 'images'
  width, height, png = figure.tensor.string_val
  assert (int(width), int(height)) == (4, 6)
  decoded = tf.io.decode_png(png).numpy()
  np.testing.assert_array_equal(decoded, image[0])
  assert any(v.metadata.plugin_data.plugin_name == 'hparams'
             for e in read
             for v in e.summary.value)


def test_corrupt_record_is_detected_by_the_reader(tmp_path):
  """TensorFlow verifies the checksums we write: a flipped byte is caught."""
  import tensorflow as tf
  writer = events.EventWriter(str(tmp_path))
  writer.write_scalars(1, {'a': 1.0})
  writer.close()
  data = bytearray(_read_bytes(writer.path))
  data[-6] ^= 1
  bad = tmp_path / 'events.out.tfevents.bad'
  bad.write_bytes(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    _read(str(bad))


def test_two_writers_of_one_process_write_two_files(tmp_path):
  first, second = (events.EventWriter(str(tmp_path)) for _ in range(2))
  first.write_scalars(1, {'a': 1.0})
  second.write_scalars(1, {'a': 2.0})
  first.close()
  second.close()
  assert first.path != second.path
  assert [len(_read(w.path)) for w in (first, second)] == [2, 2]


def test_no_file_before_the_first_write_and_none_for_other_processes(tmp_path):
  events.EventWriter(str(tmp_path)).close()
  assert not os.listdir(tmp_path)
  silent = events.EventWriter(None)
  silent.write_scalars(1, {'a': 1.0})
  silent.close()
  assert silent.path is None


def test_failed_write_warns_once_and_training_goes_on(tmp_path, caplog):
  blocker = tmp_path / 'not_a_dir'
  blocker.write_text('')
  writer = events.EventWriter(str(blocker))
  writer.write_scalars(1, {'a': 1.0})
  writer.write_scalars(2, {'a': 2.0})
  writer.close()
  warnings = [
      r for r in caplog.records if 'TensorBoard event file' in r.getMessage()
  ]
  assert len(warnings) == 1
  assert 'checkpoints and eval_history.jsonl are unaffected' in (
      warnings[0].getMessage())


def test_the_training_loop_imports_no_tensorflow():
  """The training loop and its writer import without TensorFlow (only TFDS
  imports it, when a TFDS dataset is read)."""
  code = ('import sys, mixmo_jax.training, mixmo_jax.checkpointing, '
          'mixmo_jax.feed, mixmo_jax.progress, mixmo_jax.events; '
          'print(sorted(m for m in ("tensorflow", "clu") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == '[]'
