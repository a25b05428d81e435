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

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A private cache for the embedded photographs (``SIMMIM_FAST_CACHE``) for one test module, for
    in-process runs and subprocesses alike; yields the environment to pass to subprocesses."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("SIMMIM_FAST_CACHE")
    os.environ["SIMMIM_FAST_CACHE"] = str(cache)
    yield dict(os.environ)
    if old is None:
        os.environ.pop("SIMMIM_FAST_CACHE", None)
    else:
        os.environ["SIMMIM_FAST_CACHE"] = old


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The CLIs set torch's thread count for their process (``--threads``); in-process test runs must not
    leave it changed for the tests after them."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


# ``python -m simmim_fast.kernel_check collect --op-tests`` runs the op tests with this variable set:
# every Triton launch of the session is then logged and written there at the end (distinct signatures).
_LAUNCH_LOG_PATH = os.environ.get("SIMMIM_FAST_LAUNCH_LOG")
_launch_log_session: dict = {}


def pytest_sessionstart(session):
    if _LAUNCH_LOG_PATH:
        from simmim_fast.ops import launch_log

        block = launch_log.record()
        _launch_log_session.update(block=block, log=block.__enter__())


def pytest_sessionfinish(session, exitstatus):
    if _launch_log_session:
        import json

        from simmim_fast.ops import launch_log

        records = launch_log.unique(_launch_log_session["log"])
        _launch_log_session["block"].__exit__(None, None, None)
        with open(_LAUNCH_LOG_PATH, "w") as f:
            json.dump(records, f)
