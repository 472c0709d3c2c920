"""Optional, machine-specific parts, each behind its own extra and setting.

Nothing in the core imports these modules unless their setting is on, and
deleting a folder here (with its extra) leaves the rest working:

  onednn/  oneDNN convolution kernels for x86 CPUs (`pip install -e
           ".[cpu-onednn]"`, MIXMO_ONEDNN_CONV=1).
"""
