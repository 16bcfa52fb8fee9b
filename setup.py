"""emorf_jax: receptive-field-regularised ResNets for music emotion/theme tagging, in JAX/Flax."""

import pathlib

import setuptools

TRAIN_REQUIREMENTS = [
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    "tensorflow-datasets>=4.9.4",
    "importlib_resources>=5",  # needed by tensorflow-datasets builders, which do not declare it
    "grain>=0.2.10",  # the training loader: random access, global shuffles, per-process shards
    "clu>=0.0.10",
    "threadpoolctl>=3.1",  # one BLAS/FFT thread per extraction worker
]

setuptools.setup(
    name="emorf_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of the CP-JKU system that won MediaEval 2019 Emotion and Theme Recognition in Music"
    ),
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["emorf_jax", "emorf_jax.*", "data_prep", "data_prep.*"]),
    # A plain install tags music (`emorf_jax.predict`, `emorf_jax.tagger`, the notebook, `emorf_jax.ensemble` and
    # `evaluate`); data preparation and training need the [train] extra (data_prep/extras.py checks it).
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "ml-collections>=0.1.1",
        "absl-py>=1.4",
        "numpy>=1.26",
        # JAX's dtypes: ml_dtypes 0.7.0 takes 0.7 s to import (it registers its ufunc loops in quadratic time), 0.6.0
        # 0.006 s, and every process that imports JAX pays it (benchmarks/RESULTS.md, "Start-up").
        "ml_dtypes>=0.5.4,<0.7",
        "google-crc32c>=1.5",  # TFRecord checksums on the read side (data_prep.verify, config.dataset.verify_checksums)
        "librosa>=0.10.1",
        "soundfile>=0.12.1",
        "soxr>=0.3",  # the streaming resampler of block-wise features (data_prep/features.py)
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # The ONNX export writes its graph with onnx alone, and onnxruntime runs it: the CPU tagging backend.
        "onnx>=1.17",
        "onnxruntime>=1.20",
    ],
    extras_require={
        # Data preparation and training: TFDS writes the shards, grain loads the training batches, clu and
        # TensorBoard log a run. tensorflow-cpu has no wheels for some platforms (macOS on Apple silicon), where the
        # plain install still tags.
        "train": TRAIN_REQUIREMENTS,
        # Only needed to read the authors' .pth files; the importer itself works on numpy arrays.
        "torch": ["torch>=2.1"],
        # `python -m emorf_jax.export --format=torch`: torch writes the state_dict.
        "export": ["torch>=2.6"],
        # NVIDIA GPUs: jax's CUDA 12 wheels (CUDA and cuDNN come as pip packages; NVIDIA driver >= 525), or its
        # CUDA 13 wheels for a newer driver (`pip install -e '.[cuda13]'`).
        "cuda": ["jax[cuda12]>=0.4.30"],
        "cuda13": ["jax[cuda13]>=0.10"],
        "test": [
            *TRAIN_REQUIREMENTS,  # the tests prepare data and train
            "pytest>=8",
            "pytest-xdist>=3.5",
            # Lint and format check (.ci/run); capped at a minor release, whose formatting style is stable.
            "ruff>=0.17,<0.18",
            # Execute notebooks/ top to bottom in a real kernel (tests/test_notebook.py).
            "nbclient>=0.9",
            "nbformat>=5.9",
            "ipykernel>=6.25",
            # An ffmpeg binary for the decoding tests where the system has none (tests/test_features.py).
            "imageio-ffmpeg>=0.5",
            # Capped so that a CPU-only machine takes its local CPU wheel instead of the newest CUDA build.
            "torch>=2.6,<2.14",  # the torch format and the PyTorch reference model (tests/test_export.py)
        ],
    },
)
