"""Default MixMo configuration: Cut-MixMo, WRN-28-10, CIFAR-100 recipe.

Every hyperparameter of the reference recipe (paper Appendix 6.4) lives here;
dataset files (`cifar100.py`, `cifar10.py`, `digits.py`, `tiny_imagenet.py`)
start from `get_config()` and change what differs. Named variants select the
method (see `apply_variant`):

  python -m mixmo_jax.main --config=configs/cifar100.py:cut_mixmo --workdir=DIR

Variant strings are `method[+modifier...]`, e.g. `cut_mixmo+cutmix`:
  methods:   cut_mixmo (default), linear_mixmo, mimo, vanilla, mixup, cutmix
  modifiers: cutmix (in-pixel CutMix on top of the method), augmix,
             b1 / b2 / b4 (batch repetitions), m3 (three members), local (a
             tiny network and 2 epochs, for a smoke test of a config).
Any field is overridable on the command line: `--config.mixing.p=0.6`.
"""
import ml_collections

# CIFAR normalisation (paper Appendix 6.4).
CIFAR_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# uncertainty-baselines' normalisation (its CIFAR-10 train-set mean and the
# std over the whole train set), applied to CIFAR-10 and CIFAR-100 alike.
UB_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
UB_CIFAR_STD = (0.2470, 0.2435, 0.2616)


def get_config(arg=None):
  """Returns the CIFAR-100 config with the variant `arg` (None: cut_mixmo)."""
  return apply_variant(base_config(), arg)


def base_config():
  """Returns the CIFAR-100 Cut-MixMo config before any variant."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data.
  config.dataset = 'cifar100'
  config.num_classes = 100
  config.image_size = 32
  config.num_train_examples = 0  # 0: count the split.
  config.data_dir = ''  # TFDS data_dir; '' = TFDS default (~/tensorflow_datasets).
  config.manual_dir = ''  # Folder with the original archives, for offline use.
  config.data_seed = 0  # Train/test split of datasets without one (digits).
  config.image_mean = CIFAR_MEAN
  config.image_std = CIFAR_STD

  # MixMo: M members, global batch (repetitions included), b repetitions.
  config.num_members = 2
  config.batch_size = 64
  config.batch_repetitions = 2
  config.num_epochs = 300
  config.eval_batch_size = 512

  config.model = ml_collections.ConfigDict()
  config.model.name = 'wide_resnet'
  config.model.depth = 28
  config.model.width = 10
  config.model.dtype = 'float32'  # Compute dtype; 'bfloat16' on accelerators.
  # Stem kernel init: 'mixmo' (M He-normal stems, fan-in 27) | 'mimo' (one
  # dense conv over the 3M stacked channels, fan-in 27M, uncertainty-baselines).
  config.model.stem = 'mixmo'
  # The conv of a wide block carrying its stride: 'second' (MixMo) | 'first'
  # (uncertainty-baselines). wide_resnet only.
  config.model.stride_on = 'second'
  # BatchNorm training statistics per group of this many consecutive rows of
  # the batch, whatever the device count (uncertainty-baselines: per TPU
  # core, 64 rows); 0 = over the global batch. wide_resnet only.
  config.model.bn_group_rows = 0

  config.mixing = ml_collections.ConfigDict()
  config.mixing.method = 'cut'  # 'sum' (MIMO), 'linear', 'cut', ... registry.
  config.mixing.alpha = 2.0  # kappa ~ Beta(alpha, alpha) / Dirichlet(alpha).
  config.mixing.r = 3.0  # Loss reweighting w_r (paper eq. 3 and 5).
  config.mixing.p = 0.5  # Probability of patch mixing (Cut-MixMo).
  config.mixing.p_decay_fraction = 1 / 12  # p -> 0 over the last 1/12 epochs.
  config.mixing.input_repetition = 0.0  # MIMO's rho.
  # Rows per group of the repeated batch: each group repeats its own unique
  # samples b times and the members permute its rows only, whatever the
  # device count (uncertainty-baselines: per TPU core, 64 rows = 16 unique
  # samples x 4); 0 = the global batch is one group (the MixMo code).
  config.mixing.permutation_group_rows = 0

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 4
  config.augment.flip = True
  config.augment.per_copy = True  # MixMo code: each repeated copy augmented.
  config.augment.pixel_mix = 'none'  # 'none' | 'mixup' | 'cutmix'.
  # Single-network Mixup / CutMix (M = 1): 'per_sample' (authors' runs: each
  # sample mixed with probability pixel_mix_prob, own lambda, partner another
  # sample) | 'batch' (Zhang et al. / Yun et al.: one lambda per batch).
  config.augment.pixel_mix_rule = 'per_sample'
  config.augment.pixel_mix_prob = 0.5  # Per member input / per sample.
  config.augment.cutmix_alpha = 1.0
  config.augment.mixup_alpha = 1.0
  # AugMix (CIFAR-100-C runs), on device on each member input after crop/flip.
  config.augment.augmix = False
  config.augment.augmix_rule = 'mixmo'  # 'mixmo' (authors') | 'augmix'.
  config.augment.augmix_severity = 3
  config.augment.augmix_width = 3
  config.augment.augmix_depth = -1  # <= 0: uniform in {1..4} per chain.
  # 'per_sample' (the authors' code: one draw per (sample, member), shared
  # by the b copies and the in-pixel partner) | 'per_input' (independent).
  config.augment.augmix_draws = 'per_sample'

  config.optimizer = ml_collections.ConfigDict()
  # lr = base_learning_rate * (batch_size / b) / reference_batch_size,
  # i.e. 0.1 / b * batch_size / 128 (paper Appendix 6.4).
  config.optimizer.base_learning_rate = 0.1
  config.optimizer.reference_batch_size = 128
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.l2 = 3e-4  # l2 * sum(params ** 2) added to the loss.
  config.optimizer.weight_decay = 0.0  # Coupled decay added to the gradient.
  config.optimizer.warmup_epochs = 1.0
  # If > 0, the warm-up lasts this many steps times b instead (Tiny ImageNet).
  config.optimizer.warmup_steps_per_repetition = 0
  config.optimizer.decay_epochs = (100, 200, 225)
  config.optimizer.decay_factor = 0.1

  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.ensemble = 'logits'  # 'logits' (MixMo) | 'probs' (MIMO).
  config.evaluation.calibration_seed = 0

  # Split a CPU-only host into this many XLA devices (data parallel over the
  # cores; 0 = XLA's default, one device). No effect on GPUs and TPUs.
  config.cpu_devices = 0

  # The paper's protocol (Appendix 6.5): the test set after every epoch;
  # eval.json reports the final checkpoint and `best_on_test`, the epoch of
  # best ensemble test top-1 (latest on ties) that Tables 1, 2, 5, 6 and 9
  # quote (Table 8 quotes the final epoch). Costs one test-set pass per epoch.
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 10
  # Also save each evaluated epoch that reaches the best test top-1 so far
  # (latest on ties) and keep the best checkpoint through rotation, for
  # `evaluate --step=best` / `predict.load(..., step='best')`.
  config.keep_best_checkpoint = True
  config.keep_checkpoints = 3
  config.log_every_steps = 100
  config.variant = 'cut_mixmo'
  # Locked: setting a field that does not exist (a typo in a config file or
  # on the command line) fails at once, with ml_collections' "did you mean".
  config.lock()
  return config


METHODS = ('cut_mixmo', 'linear_mixmo', 'mimo', 'vanilla', 'mixup', 'cutmix',
           'ub_mimo')
MODIFIERS = ('cutmix', 'augmix', 'b1', 'b2', 'b4', 'm3', 'local')


def _set_method(config, method):
  """Sets the mixing method and its batch repetitions / members."""
  if method == 'cut_mixmo':
    config.mixing.method = 'cut'
  elif method == 'linear_mixmo':
    config.mixing.method = 'linear'
  elif method == 'mimo':
    config.mixing.method = 'sum'
  elif method == 'ub_mimo':
    _set_ub_mimo(config)
  elif method in ('vanilla', 'mixup', 'cutmix'):
    config.num_members = 1
    config.batch_repetitions = 1
    config.mixing.method = 'sum'
    config.augment.pixel_mix = 'none' if method == 'vanilla' else method
  else:
    raise ValueError(f'config variant: unknown method {method!r}; allowed: '
                     f'{", ".join(METHODS)}')


def _set_ub_mimo(config):
  """uncertainty-baselines' baselines/cifar/mimo.py with its default flags.

  ensemble_size M = 3, batch_repetitions b = 4, input_repetition_probability
  rho = 0, WRN-28-10, per-core batch 64 on 8 cores = global batch 512 (128
  unique samples per step), base_learning_rate 0.1 scaled by the 128 unique
  samples / 128, 1 warm-up epoch, x0.2 at epochs 100, 200, 225 of 250, l2
  3e-4, SGD Nesterov momentum 0.9, seed 42; augmentation before the
  repetition (pad to 36 x 36, i.e. 2 pixels a side, random 32 x 32 crop,
  flip), its normalisation UB_CIFAR_MEAN / UB_CIFAR_STD; the MIMO stem (one dense conv over the 3M
  stacked channels, fan-in 27M), the stride on a block's first conv, and
  the members' probabilities averaged at test time. Its 8 TPU cores each
  permute their own 64 rows (16 unique samples x 4) and compute BatchNorm
  statistics over them: `permutation_group_rows` and `bn_group_rows` = 64
  give that 8-core run on any device count (1 GPU included).
  """
  config.num_members = 3
  config.batch_repetitions = 4
  config.batch_size = 512
  config.num_epochs = 250
  config.seed = 42
  config.mixing.method = 'sum'
  config.mixing.input_repetition = 0.0
  config.model.name = 'wide_resnet'
  config.model.depth = 28
  config.model.width = 10
  config.model.stem = 'mimo'
  config.model.stride_on = 'first'
  config.model.bn_group_rows = 64
  config.mixing.permutation_group_rows = 64
  config.augment.per_copy = False
  config.augment.crop_padding = 2
  config.augment.flip = True
  config.image_mean = UB_CIFAR_MEAN
  config.image_std = UB_CIFAR_STD
  config.optimizer.base_learning_rate = 0.1
  config.optimizer.reference_batch_size = 128
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.decay_epochs = (100, 200, 225)
  config.optimizer.decay_factor = 0.2
  config.optimizer.l2 = 3e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.evaluation.ensemble = 'probs'


def _apply_modifier(config, modifier):
  """Applies one `+modifier` of a variant string."""
  if modifier == 'cutmix':
    config.augment.pixel_mix = 'cutmix'
  elif modifier == 'augmix':
    config.augment.augmix = True
  elif modifier in ('b1', 'b2', 'b4'):
    config.batch_repetitions = int(modifier[1:])
  elif modifier == 'm3':
    config.num_members = 3
  elif modifier == 'local':
    config.model.depth = 10
    config.model.width = 1
    config.num_epochs = 2
    config.optimizer.decay_epochs = (1,)
    config.eval_every_epochs = 1
    config.checkpoint_every_epochs = 1
  else:
    raise ValueError(f'config variant: unknown modifier {modifier!r}; '
                     f'allowed: {", ".join(MODIFIERS)}')


def apply_variant(config, arg):
  """Applies a variant string `method[+modifier...]` (None: cut_mixmo)."""
  method, *modifiers = (arg or 'cut_mixmo').split('+')
  _set_method(config, method)
  for modifier in modifiers:
    _apply_modifier(config, modifier)
  config.variant = arg or 'cut_mixmo'
  return config
