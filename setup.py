"""simmim-fast: kernel-accelerated SimMIM masked image modeling.

Install (torch first, pinned, from the local mirror):
    pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]"
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _native_module():
    """simmim_fast/data/native.py loaded by path (stdlib only: no torch or DALI import at install time)."""
    path = os.path.join(HERE, "simmim_fast", "data", "native.py")
    spec = importlib.util.spec_from_file_location("_simmim_fast_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_native_plugin(output_dir: str) -> None:
    """Build the native DALI plugin (kernels/, CMakeLists.txt) when CMake and DALI are present.

    Never fails the install: without CMake, a compiler or DALI (e.g. pip's isolated build
    environment), or when the build fails, it says why and the package uses the torch-side mask
    generator. ``SIMMIM_FAST_NO_NATIVE=1`` skips it. Later: ``python -m simmim_fast.data.native --build``.
    """
    if os.environ.get("SIMMIM_FAST_NO_NATIVE"):
        print("simmim-fast: SIMMIM_FAST_NO_NATIVE set: native DALI plugin not built")
        return
    try:
        native = _native_module()
        missing = native.build_requirements_missing()
        if missing:
            print("simmim-fast: native DALI plugin not built (" + "; ".join(missing) + "); masks will come from "
                  "the torch generator. Build it later with: python -m simmim_fast.data.native --build")
            return
        lib = native.build_plugin(build_dir=os.path.join(HERE, "build", "native"), output_dir=output_dir)
        print(f"simmim-fast: built native DALI plugin {lib}")
    except Exception as exc:  # never fail the install
        print(f"simmim-fast: native DALI plugin build failed, continuing without it: {exc}", file=sys.stderr)


class build_py(_build_py):
    """Standard build_py, then the native DALI plugin into simmim_fast/_native/ (in place when editable)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            out = os.path.join(HERE, "simmim_fast", "_native")
        else:
            out = os.path.join(self.build_lib, "simmim_fast", "_native")
        build_native_plugin(out)


setup(
    name="simmim-fast",
    version="0.1.0",
    description="Kernel-accelerated SimMIM masked image modeling (Swin / ViT) with a PyTorch reference path",
    packages=find_packages(include=["simmim_fast", "simmim_fast.*"]),
    package_data={"simmim_fast": ["_native/*.so"]},
    cmdclass={"build_py": build_py},
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
        # `pytest benchmarks/ --benchmark-only` is one of the three ways in: it works after the main install
        "pytest",
        "pytest-benchmark",
        "matplotlib",  # loss.png
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "dev": ["nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "simmim-train=simmim_fast.train:main",
            "simmim-info=simmim_fast.info:main",
            "simmim-visualize=simmim_fast.visualize:main",
            "simmim-avgdist=simmim_fast.avgdist:main",
            "simmim-finetune=simmim_fast.finetune:main",
            "simmim-linear-probe=simmim_fast.linear_probe:main",
            "simmim-probe=simmim_fast.probe:main",
        ]
    },
)
