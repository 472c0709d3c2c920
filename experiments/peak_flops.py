"""Peak dense FLOP/s of common accelerators, for model FLOP utilisation (MFU).

Numbers are per chip, dense (no 2:4 sparsity), from the vendors' spec sheets:
  NVIDIA A100 datasheet (SXM): bf16 312 TFLOP/s, fp32 19.5 TFLOP/s.
  NVIDIA H100 datasheet (SXM): bf16 989 TFLOP/s (1979 is with sparsity),
    fp32 67 TFLOP/s; H100 PCIe: bf16 756, fp32 51.
  NVIDIA H200 datasheet (SXM): same compute as H100 SXM, bf16 989, fp32 67.
  NVIDIA L4 datasheet: bf16 121 TFLOP/s (242 with sparsity), fp32 30.3.
  NVIDIA T4 datasheet: fp32 8.1 TFLOP/s; no bf16 (fp16 tensor cores only).
  NVIDIA V100 datasheet (SXM2): fp32 15.7 TFLOP/s; no bf16.
  Google Cloud TPU system architecture pages: v4 275, v5e 197, v5p 459,
    v6e (Trillium) 918 bf16 TFLOP/s per chip (fp32 matmuls run as several
    bf16 passes; no fp32 peak is quoted).
None = not quoted by the vendor (MFU is then not reported).
"""

# (substring of jax's device_kind, lowercase) -> (bf16, fp32) FLOP/s.
# More specific entries first (H100 PCIe before H100).
PEAK_FLOPS = (
    ('a100', (312e12, 19.5e12)),
    ('h100 pcie', (756e12, 51e12)),
    ('h100', (989e12, 67e12)),
    ('h200', (989e12, 67e12)),
    ('l4', (121e12, 30.3e12)),
    ('t4', (None, 8.1e12)),
    ('v100', (None, 15.7e12)),
    ('tpu v4', (275e12, None)),
    ('tpu v5 lite', (197e12, None)),  # v5e's device_kind.
    ('tpu v5e', (197e12, None)),
    ('tpu v5p', (459e12, None)),
    ('tpu v5', (459e12, None)),
    ('tpu v6 lite', (918e12, None)),  # v6e's device_kind.
    ('tpu v6e', (918e12, None)),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one chip for 'bfloat16' or 'float32'; None if unknown."""
  kind = device_kind.lower()
  for key, (bf16, fp32) in PEAK_FLOPS:
    if key in kind:
      return bf16 if dtype == 'bfloat16' else fp32
  return None
