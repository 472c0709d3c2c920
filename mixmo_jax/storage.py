"""Bytes at a path: a local file, or an object in a bucket (gs://).

    storage.write_bytes('gs://bucket/run/config.json', data)
    storage.read_bytes('/tmp/run/config.json')

Local paths go through `os` as they always did: atomic writes through a
renamed temporary file, appends cut back when they fail. URLs go through
fsspec (gcsfs for gs://, honouring STORAGE_EMULATOR_HOST): an object is
written whole in one request, so a write is atomic there too; an append
reads the object and writes it back (one writer per workdir: process 0 of
the trainer holding the workdir's lease). orbax and tensorstore take gs://
themselves: a URL is passed to them as it is, never made absolute.

TensorFlow's GCS client (which `etils.epath`, and so orbax, would pick when
TensorFlow is installed) cannot be pointed at an emulator and pulls
TensorFlow into training: `mixmo_jax` sets EPATH_USE_TF=false unless the
user set it, so that orbax's own file operations use gcsfs as well.
"""
import io
import os
import re

URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')
# URL schemes a workdir may use -> the fsspec package that serves them.
SCHEMES = {'gs': 'gcsfs'}


def scheme(path: str) -> str | None:
  """'gs' for 'gs://bucket/x', None for a local path."""
  match = URL.match(os.fspath(path))
  return match.group(1) if match else None


def is_url(path: str) -> bool:
  return scheme(path) is not None


def url_problem(path: str) -> str | None:
  """Why `path` cannot hold a workdir, or None: a local path, or a URL of a
  supported store whose package is installed."""
  found = scheme(path)
  if found is None:
    return None
  if found not in SCHEMES:
    return (f'{path}: {found}:// is not supported (supported: a local path, '
            f'{", ".join(s + "://" for s in SCHEMES)}; or mount the store '
            'as a folder and pass the mounted path)')
  import importlib.util
  if importlib.util.find_spec(SCHEMES[found]) is None:
    return (f'{path}: {found}:// needs the package {SCHEMES[found]} '
            f'(pip install {SCHEMES[found]})')
  return None


def filesystem(path: str):
  """The fsspec filesystem of a URL (listings never cached: orbax writes
  through tensorstore, behind fsspec's back)."""
  import fsspec
  return fsspec.filesystem(
      scheme(path), use_listings_cache=False, skip_instance_cache=False)


def _store_error(path: str, error: Exception) -> OSError:
  """Any error of an object store as an OSError naming the object."""
  if isinstance(error, OSError):
    return error
  return OSError(0, store_reason(error), path)


def store_reason(error: Exception) -> str:
  """One line saying why a storage operation failed."""
  return ' '.join(str(error).split())[:200] or type(error).__name__


def join(base: str, *names: str) -> str:
  """base/name/...; a URL keeps its '//' (os.path.join, never normalised)."""
  return os.path.join(base, *names)


def absolute(path: str) -> str:
  """An absolute local path; a URL unchanged."""
  return path if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  try:
    return filesystem(path).exists(path)
  except Exception as e:
    raise _store_error(path, e) from None


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  try:
    return filesystem(path).isdir(path)
  except Exception as e:
    raise _store_error(path, e) from None


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  try:
    return filesystem(path).isfile(path)
  except Exception as e:
    raise _store_error(path, e) from None


def listdir(path: str) -> list[str]:
  """The names in a folder ([] when it does not exist)."""
  if not is_url(path):
    return os.listdir(path) if os.path.isdir(path) else []
  fs = filesystem(path)
  try:
    entries = fs.ls(path, detail=False) if fs.isdir(path) else []
  except FileNotFoundError:
    return []
  except Exception as e:
    raise _store_error(path, e) from None
  return sorted({e.rstrip('/').rsplit('/', 1)[-1] for e in entries})


def read_bytes(path: str) -> bytes:
  """The content (FileNotFoundError when absent)."""
  if not is_url(path):
    with open(path, 'rb') as f:
      return f.read()
  try:
    return filesystem(path).cat_file(path)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise _store_error(path, e) from None


def write_bytes(path: str, data: bytes) -> None:
  """Replaces the content atomically (the old or the new, never a mix).

  Raises:
    OSError: it cannot be written; no temporary file is left.
  """
  if is_url(path):
    try:
      filesystem(path).pipe_file(path, data)
    except Exception as e:
      raise _store_error(path, e) from None
    return
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def append_bytes(path: str, data: bytes) -> None:
  """Appends all of `data` or nothing (a failed local write is cut back to
  the old size; an object is written back whole)."""
  if is_url(path):
    try:
      old = read_bytes(path)
    except FileNotFoundError:
      old = b''
    write_bytes(path, old + data)
    return
  with open(path, 'ab') as f:
    size = f.tell()
    try:
      f.write(data)
      f.flush()
    except OSError:
      f.truncate(size)
      raise


def makedirs(path: str) -> None:
  """Creates a local folder and its parents (buckets have no folders)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def remove_tree(path: str) -> None:
  """Removes a folder and everything below it; errors are ignored."""
  if not is_url(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    return
  try:
    filesystem(path).rm(path, recursive=True)
  except Exception:
    pass


def move(source: str, target: str) -> None:
  """Moves a folder (objects are copied, then deleted)."""
  if not is_url(source):
    import shutil
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    return
  try:
    filesystem(source).mv(source, target, recursive=True)
  except Exception as e:
    raise _store_error(source, e) from None


def save_figure(fig, path: str, extension: str, **kwargs) -> None:
  """matplotlib's `fig.savefig` at a local path (its folder created) or a
  URL; `kwargs` go to savefig (e.g. dpi)."""
  if not is_url(path):
    if os.path.dirname(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, format=extension, **kwargs)
    return
  buffer = io.BytesIO()
  fig.savefig(buffer, format=extension, **kwargs)
  write_bytes(path, buffer.getvalue())
