"""scikit-learn's handwritten digits: the embedded offline dataset.

1,797 real 8x8 digits, a seeded stratified 80/20 split (1,437 / 360), resized
to 16x16 with 3 channels (the CIFAR networks run unchanged on any size; 16
is twice the digits' own resolution and a quarter of 32x32's compute), random
crops padded by 2 (CIFAR's 4 at 32). A small WRN-10-2 trains in about a
minute and a half on 2 CPU cores:

  python -m mixmo_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m mixmo_jax.evaluate --workdir=/tmp/digits

Variants as in mixmo_jax/configs/base.py (cut_mixmo, linear_mixmo, mimo, vanilla, ...).
"""
from mixmo_jax.configs import base


def get_config(arg=None):
  config = base.base_config()
  config.dataset = 'digits'
  config.num_classes = 10
  config.image_size = 16
  config.augment.crop_padding = 2
  config.image_mean = (0.5, 0.5, 0.5)
  config.image_std = (0.5, 0.5, 0.5)
  config.batch_size = 64
  config.model.depth = 10
  config.model.width = 2
  config.num_epochs = 20
  config.augment.flip = False  # A mirrored digit is another symbol.
  # 1,437 images make short epochs (44 steps at b = 2): a larger rate (0.1
  # at b = 2 instead of 0.025) and x0.1 decays at epochs 10, 15 and 18.
  config.optimizer.base_learning_rate = 0.4
  config.optimizer.decay_epochs = (10, 15, 18)
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 5
  config.log_every_steps = 50
  config.cpu_devices = 2  # 1.4x faster on a 2-core laptop or CI machine.
  return base.apply_variant(config, arg)
