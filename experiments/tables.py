"""The paper's experiments: one `Entry` per row that the paper ran itself.

Rows of Tables 1, 2, 5, 6, 8 and 9 (the rows of `paper_results.csv`;
rows the paper quotes from other work, marked with a dagger, are not there)
and the M >= 2 study of Figure 9. Each entry names the row as results.csv
does (table, dataset, network, width, method, cutmix, b, n_networks) and says
how to train one network of it:

    Entry(table='1', dataset='cifar100', network='wrn28', width=10,
          method='cut_mixmo', cutmix=True, b=4, n_networks=1,
          config='configs/cifar100.py:cut_mixmo+cutmix+b4',
          overrides=(('model.width', 10),))
    ->  python -m mixmo_jax.main --config=configs/cifar100.py:cut_mixmo+cutmix+b4 \
            --config.model.width=10 --config.seed=K --workdir=...

Conventions:
  * `seeds` (default 0, 1, 2): the independent repetitions of a row; the
    summary reports mean +- std over them (the paper averages 3 runs).
  * Ensembles (`n_networks` = N > 1: deep ensembles, ensembles of N MixMo
    networks in Tables 6 and 9) are N independently trained networks of the
    member config `config`, combined at evaluation. Repetition k of an
    N-ensemble uses the trainings of seeds k*N, ..., k*N + N - 1 (disjoint,
    so the repetitions are independent): `member_seeds(k)`.
  * Table 8 (no early stopping) is the final checkpoint of the very same
    trainings as Table 1; our evaluation always uses the final checkpoint, so
    our numbers compare directly with Table 8 (`best_epoch` = 0) and only
    indirectly with the best-epoch numbers (`best_epoch` = 1) of the others.
  * Table 2's mixing blocks are Cut-MixMo (b = 2) with `config.mixing.method`
    set to the block's registry name (`TABLE2_BLOCKS`).
  * Figure 9 (table 'fig9'): MIMO and Cut-MixMo with M = 2 and 3 members,
    WRN-28-10 on CIFAR-100, b = 2 (the paper's Section 4.3 setting); the paper
    shows bars only, its text quotes the members' top-1 (`FIG9_PAPER_TEXT`).
  * Table 4 (CIFAR-100-C, WRN-28-10, with and without AugMix) is in
    results.csv (dataset 'cifar100_c', method '<method>_augmix' for the
    AugMix columns, metrics top1 / top5 / nll). Its entries
    (`Entry.corruptions`, also `TABLE4_ENTRIES`) are evaluated by run.py
    with `mixmo_jax.evaluate --corruptions=DIR` into eval_cifar_c.json (or
    eval_ensemble<N>_cifar_c.json) and summarized from its
    ['corruptions']['mean'] (mean over the corruption x severity cells);
    their trainings without AugMix are those of Table 1.

Rows with the same resolved config (and seed) are the same training: the
planner in run.py trains each once (`training_key`).
"""
import dataclasses
import functools
import json
import os
from typing import Any
from collections.abc import Iterable, Sequence

from mixmo_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEEDS = (0, 1, 2)
TABLES = ('1', '2', '4', '5', '6', '8', '9', 'fig9', 'ub')

CIFAR_CONFIGS = {
    'cifar100': 'configs/cifar100.py',
    'cifar10': 'configs/cifar10.py',
    'cifar100_c': 'configs/cifar100.py'
}  # Trained on CIFAR-100.
TINY_CONFIG = 'configs/tiny_imagenet.py'
CIFAR_WIDTHS = (2, 3, 4, 5, 7, 10, 14)  # Table 9, WRN-28-w.
TINY_WIDTHS = (1, 2, 3)  # Table 5, PreActResNet-18-w.

# Table 2: results.csv method -> registry name for --config.mixing.method.
TABLE2_BLOCKS = {
    'mixmo_block_mixup': 'linear',
    'mixmo_block_horizontal_concat': 'top_bottom_concat',
    'mixmo_block_vertical_concat': 'left_right_concat',
    'mixmo_block_patchup_2d': 'patchup',
    'mixmo_block_fmix': 'fmix',
    'mixmo_block_cowmask': 'cowmask',
    'mixmo_block_cutmix': 'cut',
}

# Figure 9 has no numbers in results.csv; Section 4.3.4 quotes the members'
# (individual) top-1 in percent: (method, M) -> value.
FIG9_PAPER_TEXT = {
    ('cut_mixmo', 2): 82.3,
    ('cut_mixmo', 3): 79.5,
    ('mimo', 2): 79.8,
    ('mimo', 3): 77.7
}

# Methods that train a single-member network (M = 1, b = 1).
SINGLE_MEMBER_METHODS = ('vanilla', 'mixup', 'cutmix', 'deep_ensemble')


@dataclasses.dataclass(frozen=True)
class Entry:
  """One paper row and how to train one network of it.

  Attributes:
    table: '1', '2', '5', '6', '8', '9' or 'fig9'.
    dataset, network, width, method, cutmix, b, n_networks: the row's key,
      spelled as in results.csv (network 'wrn28' or 'preact_resnet18').
    config: `configs/<file>.py:<variant>` of one (member) network.
    overrides: ((field, value), ...) applied as --config.<field>=<value>.
    num_members: M of one network (1 for vanilla / Mixup / CutMix / DE).
    seeds: repetitions (for ensembles: repetition indices, see member_seeds).
    best_epoch: 1 if the paper reports the best test epoch, 0 for the final
      epoch (Table 8), None when unknown (Figure 9).
    corruptions: evaluated on CIFAR-100-C (Table 4), not the clean test set.
  """
  table: str
  dataset: str
  network: str
  width: int
  method: str
  cutmix: bool
  b: int
  n_networks: int
  config: str
  overrides: tuple[tuple[str, Any], ...] = ()
  num_members: int = 2
  seeds: tuple[int, ...] = DEFAULT_SEEDS
  best_epoch: int | None = 1
  corruptions: bool = False

  @property
  def key(self) -> tuple:
    """(table, dataset, network, width, method, cutmix, b, n_networks)."""
    return (self.table,) + self.row_key

  @property
  def row_key(self) -> tuple:
    """The key without the table: the same row in another table."""
    return (self.dataset, self.network, self.width, self.method,
            int(self.cutmix), self.b, self.n_networks)

  @property
  def name(self) -> str:
    """<dataset>_<network>-<width>_<method>[_cutmix][_m<M>]_b<b>[_n<N>]."""
    parts = [self.dataset, f'{self.network}-{self.width}', self.method]
    if self.cutmix:
      parts.append('cutmix')
    if self.num_members > 2:
      parts.append(f'm{self.num_members}')
    parts.append(f'b{self.b}')
    if self.n_networks > 1:
      parts.append(f'n{self.n_networks}')
    return '_'.join(parts)

  @property
  def label(self) -> str:
    """'<table>/<name>', unique over the registry."""
    return f'{self.table}/{self.name}'

  def member_seeds(self, repetition: int) -> tuple[int, ...]:
    """Training seeds of repetition k: (k*N, ..., k*N + N - 1); N = 1: (k,)."""
    n = self.n_networks
    return tuple(range(repetition * n, repetition * n + n))

  def config_args(self) -> list[str]:
    """Command-line flags selecting the config: --config=... --config.x=v."""
    return [f'--config={self.config}'] + [
        f'--config.{field}={format_value(value)}'
        for field, value in self.overrides
    ]


def format_value(value: Any) -> str:
  """A config value as ml_collections' command-line parser reads it."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return str(value)


# ----------------------------------------------------------------------------
# The registry.
# ----------------------------------------------------------------------------

AUGMIX_SUFFIX = '_augmix'  # Table 4's AugMix columns: method + suffix.


def _variant(method: str, cutmix: bool, b: int, num_members: int = 2) -> str:
  """The config variant string of one network of a row."""
  augmix = method.endswith(AUGMIX_SUFFIX)
  method = method[:-len(AUGMIX_SUFFIX)] if augmix else method
  if method in ('vanilla', 'mixup', 'cutmix'):
    mods = ['cutmix'] if cutmix else []
  else:
    mods = (['cutmix'] if cutmix else []) + [f'b{b}']
    if num_members == 3:
      mods.append('m3')
  if augmix:
    mods.append('augmix')
  return '+'.join([method] + mods)


def _entry(table, dataset, width, method, cutmix, b, n_networks=1,
           num_members=None, extra=(), best_epoch=1) -> Entry:
  """An entry whose member config follows from (dataset, method, cutmix, b)."""
  tiny = dataset == 'tiny_imagenet'
  member_method = method.replace('deep_ensemble', 'vanilla')
  if num_members is None:
    base = member_method.replace(AUGMIX_SUFFIX, '')
    num_members = 1 if base in SINGLE_MEMBER_METHODS else 2
  if method in TABLE2_BLOCKS:
    member_method = 'cut_mixmo'
  config_file = TINY_CONFIG if tiny else CIFAR_CONFIGS[dataset]
  variant = _variant(member_method, cutmix, b, num_members)
  return Entry(table=table, dataset=dataset,
               network='preact_resnet18' if tiny else 'wrn28', width=width,
               method=method, cutmix=bool(cutmix), b=b, n_networks=n_networks,
               config=f'{config_file}:{variant}',
               overrides=(('model.width', width),) + tuple(extra),
               num_members=num_members, best_epoch=best_epoch,
               corruptions=dataset.endswith('_c'))


def _cifar_main_rows(table: str, best_epoch: int) -> list[Entry]:
  """Tables 1 and 8: WRN-28-10 on CIFAR-100 and CIFAR-10."""
  rows = []
  for dataset in ('cifar100', 'cifar10'):

    def add(*args, **kwargs):
      rows.append(
          _entry(table, dataset, 10, *args, best_epoch=best_epoch, **kwargs))

    add('vanilla', 0, 1)
    add('mixup', 0, 1)
    add('cutmix', 0, 1)
    add('deep_ensemble', 0, 1, n_networks=2)
    add('deep_ensemble', 1, 1, n_networks=2)
    for b in (2, 4):
      add('mimo', 0, b)
      for method in ('linear_mixmo', 'cut_mixmo'):
        add(method, 0, b)
        add(method, 1, b)
  return rows


def _table2() -> list[Entry]:
  """Table 2: Cut-MixMo (b = 2) with the mixing block of each column."""
  return [
      _entry('2', 'cifar100', 10, method, 0, 2,
             extra=(('mixing.method', block),))
      for method, block in TABLE2_BLOCKS.items()
  ]


def _table4() -> list[Entry]:
  """Table 4: WRN-28-10 trained on CIFAR-100, tested on CIFAR-100-C.

  The paper's table lost its layout in our transcription; reconstructed as
  12 columns: 1 Net. (-, AugMix), CutMix (-), Puzzle-Mix (-, AugMix; quoted
  from its authors, left out), DE 2 Nets (-, AugMix), MIMO (-),
  Linear-MixMo (-, AugMix), Cut-MixMo (-, AugMix). The Top5 and NLL rows
  have 12 values each, which fixes that layout; the Top1 row has only 10:
  Linear-MixMo (55.6, 70.4) and Cut-MixMo (57.0, 71.1, as the text says)
  follow from the Top5 ordering, but one value, 53.6, is left for the
  three cells DE (-), DE (AugMix) and MIMO (-); DE + AugMix (Top5 88.9)
  cannot be 53.6, while DE (-) and MIMO (-) share Top5 74.9, so 53.6 is
  unassignable and these three Top1 cells are not in results.csv.
  Assumed, not printed in the table: b = 4 for MIMO and both MixMo (the
  text names Cut-MixMo b = 4), no in-pixel CutMix in the MixMo rows, and
  best_epoch 1 as in Table 1.
  """
  rows = []
  add = lambda *a, **k: rows.append(_entry('4', 'cifar100_c', 10, *a, **k))
  for suffix in ('', AUGMIX_SUFFIX):
    add('vanilla' + suffix, 0, 1)
    add('deep_ensemble' + suffix, 0, 1, n_networks=2)
    add('linear_mixmo' + suffix, 0, 4)
    add('cut_mixmo' + suffix, 0, 4)
  add('cutmix', 0, 1)
  add('mimo', 0, 4)
  return rows


def _table5() -> list[Entry]:
  """Table 5: PreActResNet-18-w on Tiny ImageNet, w in {1, 2, 3}."""
  rows = []
  for w in TINY_WIDTHS:
    for method in ('vanilla', 'mixup', 'cutmix'):
      rows.append(_entry('5', 'tiny_imagenet', w, method, 0, 1))
    for n in (2, 3, 4):
      rows.append(
          _entry('5', 'tiny_imagenet', w, 'deep_ensemble', 0, 1, n_networks=n))
    for b in (2, 4):
      for method in ('linear_mixmo', 'cut_mixmo'):
        rows.append(_entry('5', 'tiny_imagenet', w, method, 0, b))
  return rows


def _table6() -> list[Entry]:
  """Table 6: N independently trained Cut-MixMo + CutMix, b = 4."""
  return [
      _entry('6', 'cifar100', 10, 'cut_mixmo', 1, 4, n_networks=n)
      for n in (1, 2, 3)
  ]


def _table9() -> list[Entry]:
  """Table 9: WRN-28-w on CIFAR-100, b = 4, with and without CutMix."""
  rows = []
  for w in CIFAR_WIDTHS:
    for cutmix in (0, 1):
      rows.append(_entry('9', 'cifar100', w, 'vanilla', cutmix, 1))
      rows.append(
          _entry('9', 'cifar100', w, 'deep_ensemble', cutmix, 1, n_networks=2))
      rows.append(_entry('9', 'cifar100', w, 'linear_mixmo', cutmix, 4))
      rows.append(_entry('9', 'cifar100', w, 'cut_mixmo', cutmix, 4))
      rows.append(
          _entry('9', 'cifar100', w, 'cut_mixmo', cutmix, 4, n_networks=2))
  return rows


def _figure9() -> list[Entry]:
  """Figure 9: M in {2, 3} for MIMO and Cut-MixMo, WRN-28-10, b = 2."""
  return [
      _entry('fig9', 'cifar100', 10, method, 0, 2, num_members=m,
             best_epoch=None)
      for method in ('mimo', 'cut_mixmo')
      for m in (2, 3)
  ]


def _ub() -> list[Entry]:
  """uncertainty-baselines' MIMO (baselines/cifar/mimo.py, default flags:
  M = 3, b = 4, WRN-28-10), its published final-epoch numbers (table 'ub';
  its CIFAR-100-C row is the CIFAR-100 training on the corruptions)."""
  return [
      Entry(table='ub', dataset=dataset, network='wrn28', width=10,
            method='ub_mimo', cutmix=False, b=4, n_networks=1,
            config=f'{CIFAR_CONFIGS[dataset]}:ub_mimo', num_members=3,
            best_epoch=0, corruptions=dataset.endswith('_c'))
      for dataset in ('cifar100', 'cifar10', 'cifar100_c')
  ]


def _build() -> tuple[Entry, ...]:
  entries = (
      _cifar_main_rows('1', 1) + _table2() + _table5() + _table6() +
      _cifar_main_rows('8', 0) + _table9() + _figure9() + _ub() + _table4())
  labels = [e.label for e in entries]
  assert len(set(labels)) == len(labels), 'duplicate entry labels'
  return tuple(entries)


ENTRIES: tuple[Entry, ...] = _build()
TABLE4_ENTRIES: tuple[Entry, ...] = tuple(e for e in ENTRIES if e.table == '4')


def normalize_table(table: Any) -> str:
  """'1', 1, 'table1', 'Fig9', 'figure9' -> '1' / 'fig9'."""
  text = str(table).strip().lower()
  for prefix in ('table', 'tab', 'figure', 'fig'):
    if text.startswith(prefix) and text[len(prefix):].isdigit():
      text = ('fig' if prefix.startswith('fig') else '') + text[len(prefix):]
      break
  if text not in TABLES:
    raise ValueError(f'unknown table {table!r}; known: {", ".join(TABLES)}')
  return text


def select(tables: Iterable[Any] | None = None,
           datasets: Iterable[str] | None = None,
           methods: Iterable[str] | None = None,
           widths: Iterable[int] | None = None,
           seeds: Sequence[int] | None = None) -> list[Entry]:
  """Entries matching every given filter (None: any), registry order.

  `seeds` replaces the entries' seeds (repetitions) when given.
  """
  tables = None if tables is None else {normalize_table(t) for t in tables}
  datasets = None if datasets is None else set(datasets)
  methods = None if methods is None else set(methods)
  widths = None if widths is None else {int(w) for w in widths}
  out = []
  for e in ENTRIES:
    if ((tables is None or e.table in tables) and
        (datasets is None or e.dataset in datasets) and
        (methods is None or e.method in methods) and
        (widths is None or e.width in widths)):
      out.append(
          e if seeds is
          None else dataclasses.replace(e, seeds=tuple(int(s) for s in seeds)))
  return out


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def set_field(config, field: str, value: Any) -> None:
  """config.<field> = value for a dotted field (type-checked by ConfigDict)."""
  *parents, leaf = field.split('.')
  node = config
  for part in parents:
    node = node[part]
  if leaf not in node:
    raise KeyError(f'config has no field {field!r}')
  node[leaf] = value


def load_config(entry: Entry, seed: int | None = None):
  """The ConfigDict that `entry.config_args()` (+ --config.seed) selects."""
  path, sep, variant = entry.config.partition(':')
  config = configs.load(os.path.join(REPO, path) + sep + variant)
  for field, value in entry.overrides:
    set_field(config, field, value)
  if seed is not None:
    config.seed = int(seed)
  return config


def training_key(config) -> str:
  """Identity of a training run: the resolved config without seed/variant.

  Two rows whose configs agree here train the same network (for a seed).
  """
  tree = config.to_dict()
  tree.pop('seed', None)
  tree.pop('variant', None)
  return json.dumps(tree, sort_keys=True, default=list)


@functools.cache
def _owners() -> dict[str, Entry]:
  """training_key -> the entry whose workdir holds that training.

  The first single-network entry (registry order: tables 1, 2, 5, 6, 8, 9,
  fig9) with the config; ensemble-only configs belong to their first
  ensemble entry.
  """
  owners: dict[str, Entry] = {}
  for single in (True, False):
    for entry in ENTRIES:
      if (entry.n_networks == 1) == single:
        owners.setdefault(training_key(load_config(entry)), entry)
  return owners


def owner(entry: Entry) -> Entry:
  """The entry whose workdir (ROOT/<table>/<name>/seed<k>) trains `entry`."""
  return _owners()[training_key(load_config(entry))]
