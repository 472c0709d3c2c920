"""Tiny ImageNet, PreActResNet-18-w (Table 5), the Puzzle-Mix recipe.

64x64 images, 200 classes, 100k train / 10k val (used as test), read from
`tiny-imagenet-200.zip` (or its extracted folder) in `manual_dir`:

  python -m mixmo_jax.main --config=configs/tiny_imagenet.py \
      --config.manual_dir=/data/tiny --config.model.width=2 --workdir=DIR

lr = 0.2 / b (base 0.2 at reference batch 100 with batch 100), weight decay
1e-4 coupled to the gradient, x0.1 at epochs 600 and 900 of 1200, warm-up
1000 * b steps, normalisation mean 0.5 / std 0.5.
Variants as in mixmo_jax/configs/base.py.
"""
from mixmo_jax.configs import base


def get_config(arg=None):
  config = base.base_config()
  config.dataset = 'tiny_imagenet'
  config.num_classes = 200
  config.image_size = 64
  config.image_mean = (0.5, 0.5, 0.5)
  config.image_std = (0.5, 0.5, 0.5)
  config.batch_size = 100
  config.num_epochs = 1200
  config.eval_batch_size = 500
  config.model.name = 'preact_resnet18'
  config.model.width = 1
  config.optimizer.base_learning_rate = 0.2
  config.optimizer.reference_batch_size = 100
  config.optimizer.l2 = 0.0
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps_per_repetition = 1000
  config.optimizer.decay_epochs = (600, 900)
  config.eval_every_epochs = 1  # The paper's protocol (Appendix 6.5).
  config.checkpoint_every_epochs = 20
  return base.apply_variant(config, arg)
