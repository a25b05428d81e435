"""Test session setup.

Without a CUDA device, run the Triton kernels through Triton's CPU interpreter: ``TRITON_INTERPRET``
must be set before ``triton`` is imported (``@triton.jit`` reads it when a kernel is defined, i.e.
when ``simmim_fast.ops`` is imported), so it is set here, before any test module imports the
package. ``torch.cuda.is_available()`` does not import triton (checked: ``import torch`` and the
CUDA query leave ``triton`` out of ``sys.modules``). A forced ``backend="triton"`` then runs the
interpreter on CPU tensors; ``auto`` keeps the reference on CPU, so the model and training tests do
not slow down. On a GPU machine nothing is set and the same tests run the compiled kernels.
An explicit ``TRITON_INTERPRET`` in the environment wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
