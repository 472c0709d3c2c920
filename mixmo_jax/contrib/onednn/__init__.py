"""oneDNN convolution kernels for x86 CPUs (see conv.py): opt-in, through
`pip install -e ".[cpu-onednn]"` and MIXMO_ONEDNN_CONV=1."""
