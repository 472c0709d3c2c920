"""Reading CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019).

The folder is read exactly as its authors distribute it (the `CIFAR-10-C.tar`
/ `CIFAR-100-C.tar` archives of zenodo.org/records/2535967 and 3555552,
unpacked):

  <corruption>.npy   uint8 [5 * n, H, W, 3]: severities 1..5 in order, n test
                     images each (n = 10,000 for CIFAR; row s * n + j is test
                     image j at severity s + 1)
  labels.npy         int [5 * n]: the test labels repeated 5 times

for the 19 corruptions of `CORRUPTIONS` (15 benchmark corruptions + 4 extra,
paper section 4.5 and Appendix 6.4: "19 corruptions x 5 severities"). The
number of images per severity is len(labels.npy) / 5, so a miniature folder
with the same layout (e.g. n = 40) works too.

Files are opened memory-mapped (`np.load(mmap_mode='r')`): a 150 MB corruption
file is read batch by batch, never held whole in memory. Every check
(missing labels, wrong dtype or shape, disagreeing lengths) raises a
`CorruptionDataError` with a one-line message before anything is predicted.

Shapes: S = 5 severities, n images per severity, H, W image size.
"""
import os
from collections.abc import Sequence

import numpy as np

NUM_SEVERITIES = 5
LABELS_FILE = 'labels.npy'

# The 19 corruptions of CIFAR-10-C / CIFAR-100-C, in the order of Hendrycks &
# Dietterich's Figure 1 (noise, blur, weather, digital), then the 4 extras.
CORRUPTIONS = (
    'gaussian_noise',
    'shot_noise',
    'impulse_noise',
    'defocus_blur',
    'glass_blur',
    'motion_blur',
    'zoom_blur',
    'snow',
    'frost',
    'fog',
    'brightness',
    'contrast',
    'elastic_transform',
    'pixelate',
    'jpeg_compression',
    'speckle_noise',
    'gaussian_blur',
    'spatter',
    'saturate',
)


class CorruptionDataError(ValueError):
  """The corruption folder is missing a file or has one of the wrong layout."""


def _open(path: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise CorruptionDataError(
        f'{path}: cannot be read as a .npy array ({type(e).__name__}: '
        f'{" ".join(str(e).split())})') from e


def read_labels(folder: str, num_classes: int) -> np.ndarray:
  """labels.npy as int64 [5 * n], checked.

  Args:
    folder: the CIFAR-C folder.
    num_classes: C; every label must lie in [0, C).

  Returns:
    int64 [5 * n] (row s * n + j: test image j at severity s + 1).

  Raises:
    CorruptionDataError: missing file, not 1-D integer, length not a positive
      multiple of 5, or a label outside [0, C).
  """
  path = os.path.join(folder, LABELS_FILE)
  if not os.path.isfile(path):
    raise CorruptionDataError(
        f'{path} is missing: a CIFAR-C folder holds labels.npy (the test '
        f'labels repeated {NUM_SEVERITIES} times) next to the <corruption>.npy '
        'files')
  labels = _open(path)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise CorruptionDataError(
        f'{path}: expected a 1-D integer array [5 * n], got dtype '
        f'{labels.dtype} shape {labels.shape}')
  if len(labels) == 0 or len(labels) % NUM_SEVERITIES:
    raise CorruptionDataError(
        f'{path}: length {len(labels)} is not a positive multiple of '
        f'{NUM_SEVERITIES} (severities)')
  labels = np.asarray(labels, np.int64)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise CorruptionDataError(
        f'{path}: labels in [{labels.min()}, {labels.max()}] do not fit '
        f'{num_classes} classes')
  return labels


def find_corruptions(folder: str) -> tuple[list[str], list[str], list[str]]:
  """Which of the 19 corruptions the folder holds.

  Returns:
    (present, missing, ignored): present and missing names in `CORRUPTIONS`
    order; ignored = other .npy files (neither labels.npy nor one of the 19
    names), sorted.

  Raises:
    CorruptionDataError: the folder does not exist or holds none of the 19.
  """
  if not os.path.isdir(folder):
    raise CorruptionDataError(f'corruption folder {folder} does not exist')
  files = set(os.listdir(folder))
  present = [c for c in CORRUPTIONS if f'{c}.npy' in files]
  missing = [c for c in CORRUPTIONS if f'{c}.npy' not in files]
  known = {f'{c}.npy' for c in CORRUPTIONS} | {LABELS_FILE}
  ignored = sorted(f for f in files if f.endswith('.npy') and f not in known)
  if not present:
    raise CorruptionDataError(
        f'{folder} holds none of the {len(CORRUPTIONS)} CIFAR-C corruption '
        f'files (<name>.npy with name in {", ".join(CORRUPTIONS)})')
  return present, missing, ignored


def open_corruption(folder: str, name: str, num_images: int,
                    image_size: int) -> np.ndarray:
  """One corruption file, memory-mapped and checked.

  Args:
    folder: the CIFAR-C folder.
    name: one of `CORRUPTIONS`.
    num_images: 5 * n, the length of labels.npy.
    image_size: H = W expected by the model.

  Returns:
    read-only uint8 [5 * n, H, W, 3] (memory-mapped).

  Raises:
    CorruptionDataError: wrong dtype, shape or length.
  """
  path = os.path.join(folder, f'{name}.npy')
  images = _open(path)
  expected = (num_images, image_size, image_size, 3)
  if images.dtype != np.uint8 or images.shape != expected:
    raise CorruptionDataError(
        f'{path}: expected uint8 {list(expected)} (5 severities x '
        f'{num_images // NUM_SEVERITIES} images, matching labels.npy), got '
        f'{images.dtype} {list(images.shape)}')
  return images


def check_folder(folder: str, num_classes: int, image_size: int,
                 names: Sequence[str]) -> np.ndarray:
  """Checks labels.npy and every file of `names` (headers only).

  Returns:
    the labels, int64 [5 * n].
  """
  labels = read_labels(folder, num_classes)
  for name in names:
    open_corruption(folder, name, len(labels), image_size)
  return labels


def severity_slices(num_images: int) -> list[slice]:
  """Rows of severities 1..5: [s * n, (s + 1) * n), n = num_images / 5."""
  n = num_images // NUM_SEVERITIES
  return [slice(s * n, (s + 1) * n) for s in range(NUM_SEVERITIES)]
