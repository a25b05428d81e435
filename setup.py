"""simmim-fast: kernel-accelerated SimMIM masked image modeling.

Install (torch first, pinned, from the local mirror):
    pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
"""
from setuptools import find_packages, setup

setup(
    name="simmim-fast",
    version="0.1.0",
    description="Kernel-accelerated SimMIM masked image modeling (Swin / ViT) with a PyTorch reference path",
    packages=find_packages(include=["simmim_fast", "simmim_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the install command (README); any torch >= 2.11 (GPU image) works.
        "torch>=2.11",
        "torchvision>=0.26",
        "triton>=3.6",
        "timm>=1.0.20",
        "xformers>=0.0.30",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        # real photographs for the embedded default data set (skimage/data)
        "scikit-image>=0.22",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "dev": ["pytest", "pytest-benchmark", "nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "simmim-train=simmim_fast.train:main",
            "simmim-info=simmim_fast.info:main",
            "simmim-visualize=simmim_fast.visualize:main",
            "simmim-avgdist=simmim_fast.avgdist:main",
        ]
    },
)
