"""A plain PyTorch MIMO wide ResNet: the speed peer of experiments/benchmark.py.

Written for the benchmark only (no training loop, no data): one training
step of a MIMO WRN-d-w with the same layout as mixmo_jax.models.wide_resnet,

    M stems: 3x3 conv, 16 channels, summed over members     [B,16,H,W]
    stage 1..3: n = (d - 4) / 6 pre-activation blocks,
      widths 16w / 32w / 64w, strides 1 / 2 / 2,
      block: BN-ReLU-conv3x3-BN-ReLU-conv3x3(stride s) + shortcut(x),
      shortcut = 1x1 stride-s conv of the raw input when the shape changes
    BN-ReLU, global average pool, M dense heads             [B,M,C]

trained with the cross-entropy summed over the M members and SGD with
Nesterov momentum 0.9 (the l2 term of mixmo_jax is the coupled weight decay
here; same cost). Tensors are NCHW by default, PyTorch's usual layout;
`channels_last=True` tries NHWC.

    step = TorchStep(depth=16, width=4, num_classes=100, num_members=2,
                     batch_size=64)
    seconds = step.time(steps=3)
"""
import time

import torch
from torch import nn
import torch.nn.functional as F


class _Block(nn.Module):
  """Pre-activation wide block, stride on conv2 (as mixmo_jax)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin, momentum=0.1, eps=1e-5)
    self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
    self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    out = self.conv1(F.relu(self.bn1(x)))
    out = self.conv2(F.relu(self.bn2(out)))
    return out + (x if self.shortcut is None else self.shortcut(x))


class MimoWideResNet(nn.Module):
  """xs [B, M, 3, H, W] -> logits [B, M, C]; core input sum_i stem_i(x_i)."""

  def __init__(self, depth: int, width: int, num_classes: int,
               num_members: int):
    super().__init__()
    if depth < 10 or (depth - 4) % 6:
      raise ValueError(f'depth must be 6n+4 with n >= 1, got {depth}')
    n = (depth - 4) // 6
    self.num_members, self.num_classes = num_members, num_classes
    self.stems = nn.ModuleList(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False) for _ in range(num_members))
    blocks, cin = [], 16
    for mult, stride in zip((16, 32, 64), (1, 2, 2)):
      for i in range(n):
        blocks.append(_Block(cin, mult * width, stride if i == 0 else 1))
        cin = mult * width
    self.core = nn.Sequential(*blocks)
    self.final_bn = nn.BatchNorm2d(cin, momentum=0.1, eps=1e-5)
    self.heads = nn.Linear(cin, num_members * num_classes)

  def forward(self, xs):
    h = sum(stem(xs[:, i]) for i, stem in enumerate(self.stems))
    h = F.relu(self.final_bn(self.core(h)))
    logits = self.heads(h.mean(dim=(2, 3)))
    return logits.view(-1, self.num_members, self.num_classes)


class TorchStep:
  """One MIMO training step (forward, summed CE, backward, SGD Nesterov)."""

  def __init__(self, depth: int, width: int, num_classes: int, num_members: int,
               batch_size: int, image_size: int = 32,
               channels_last: bool = False, seed: int = 0, threads: int = 0):
    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.model = MimoWideResNet(depth, width, num_classes, num_members)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05,
                                     momentum=0.9, nesterov=True,
                                     weight_decay=3e-4)
    xs = torch.randn(batch_size, num_members, 3, image_size, image_size)
    self.targets = torch.randint(0, num_classes, (batch_size, num_members))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
      self.model = self.model.to(memory_format=fmt)
    self.xs = xs.contiguous()
    self.model.train()

  def about(self) -> str:
    return f'torch {torch.__version__} ({torch.get_num_threads()} threads)'

  def step(self) -> float:
    """Runs one update; returns the loss."""
    self.optimizer.zero_grad(set_to_none=True)
    logits = self.model(self.xs)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1),
        reduction='sum')
    loss = loss / logits.shape[0]  # Sum over members, mean over the batch.
    loss.backward()
    self.optimizer.step()
    return loss.item()

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps (loss.item() synchronises)."""
    start = time.perf_counter()
    for _ in range(steps):
      self.step()
    return (time.perf_counter() - start) / steps
