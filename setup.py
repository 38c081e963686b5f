"""Package metadata for fliqs_keras.

TensorFlow is an extra, not a requirement: `pip install fliqs_keras[cpu]` takes
the small `tensorflow-cpu` wheel and `fliqs_keras[gpu]` the CUDA build, so a
CPU user is never made to download the large GPU `tensorflow` wheel. TFLite
export needs the LiteRT quantizer and interpreter (`fliqs_keras[export]`),
ImageNet and CIFAR-10 pipelines need `fliqs_keras[tfds]`, the search on
Keras's JAX backend `fliqs_keras[jax]` (CPU; a GPU needs JAX's CUDA build), and the Pareto
benchmark's HGQ2 baseline `fliqs_keras[benchmarks]`. The
pinned set that the README's commands install is `requirements/cpu.txt`.
"""

import pathlib
import re

from setuptools import find_packages, setup

ROOT = pathlib.Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "fliqs_keras" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="fliqs_keras",
    version=VERSION,
    description=(
        "One-shot mixed-precision integer and floating-point quantization search (FLIQS) "
        "for Keras 3, with TFLite export"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["fliqs_keras", "fliqs_keras.*"]),
    python_requires=">=3.11",
    install_requires=[
        "keras>=3.15,<4",
        "ml-dtypes>=0.5",
        "numpy>=1.26",
        "absl-py>=2.1",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.21,<2.22"],
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "jax": ["jax>=0.10"],
        "export": ["ai-edge-quantizer>=0.10,<0.11", "ai-edge-litert>=2.3,<2.4"],
        "examples": ["mlxtend>=0.23", "matplotlib>=3.8", "scikit-learn>=1.4"],
        "tfds": ["tensorflow-datasets>=4.9,<5", "importlib_resources>=6"],
        "benchmarks": ["hgq2>=0.2,<0.3", "mlxtend>=0.23", "matplotlib>=3.8", "scikit-learn>=1.4"],
        "test": ["pytest>=8", "jax>=0.10", "mlxtend>=0.23", "matplotlib>=3.8", "scikit-learn>=1.4",
                 "tensorflow-datasets>=4.9,<5", "importlib_resources>=6", "ai-edge-quantizer>=0.10,<0.11",
                 "ai-edge-litert>=2.3,<2.4", "sphinx>=8"],
        "docs": ["sphinx>=8"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
