"""The native DALI plugin (``kernels/`` -> ``simmim_fast/_native/libsimmim_fast_dali.so``): find, build, load once.

The plugin registers the ``SimmimMask`` operator (``nvidia.dali.fn.simmim_mask`` once loaded; a CPU
backend always, a GPU backend when it was built with nvcc). It is built by the top-level
``CMakeLists.txt`` against the installed DALI::

    python -m simmim_fast.data.native --build        # configure + build into simmim_fast/_native/
    python -m simmim_fast.data.native --status       # what is found / loaded, and why not

Loading rules (measured with DALI 2.4): loading the same file twice is harmless, loading a second
copy from another path aborts the process ("already registered"). :func:`load_plugin` therefore
loads exactly one copy per process and refuses (``RuntimeError``) to load a different path after it.

This module imports only the standard library at import time: ``setup.py`` loads it by file path to
build the plugin during installation.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

__all__ = [
    "PLUGIN_FILENAME",
    "OP_NAME",
    "ENV_PLUGIN",
    "native_dir",
    "source_dir",
    "find_plugin",
    "plugin_unavailable_reasons",
    "build_requirements_missing",
    "build_plugin",
    "load_plugin",
    "try_load_plugin",
    "loaded_plugin",
    "plugin_backends",
    "main",
]

log = logging.getLogger(__name__)

PLUGIN_FILENAME = "libsimmim_fast_dali.so"
OP_NAME = "simmim_mask"  # nvidia.dali.fn.<OP_NAME>; C++ schema name SimmimMask
_SCHEMA_NAME = "SimmimMask"
ENV_PLUGIN = "SIMMIM_FAST_DALI_PLUGIN"  # explicit path of the plugin .so (overrides the package copy)

_lock = threading.Lock()
_loaded: Path | None = None
_absent_logged = False


def native_dir() -> Path:
    """``simmim_fast/_native``: where the build puts the plugin and where the package looks for it."""
    return Path(__file__).resolve().parent.parent / "_native"


def source_dir() -> Path:
    """The source checkout holding ``CMakeLists.txt`` and ``kernels/`` (the package's parent folder)."""
    return Path(__file__).resolve().parents[2]


def find_plugin() -> Path | None:
    """The plugin file to load: ``$SIMMIM_FAST_DALI_PLUGIN`` if set, else ``simmim_fast/_native/``'s copy."""
    env = os.environ.get(ENV_PLUGIN)
    if env:
        p = Path(env).expanduser()
        return p if p.is_file() else None
    p = native_dir() / PLUGIN_FILENAME
    return p if p.is_file() else None


def _dali_import_error() -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # any import failure is a reason, never a crash
        return f"nvidia.dali not importable: {type(exc).__name__}: {exc}"
    return None


def plugin_unavailable_reasons() -> list[str]:
    """Every reason the plugin cannot be loaded now (empty list: it can, or it is loaded)."""
    if _loaded is not None:
        return []
    reasons = []
    err = _dali_import_error()
    if err:
        reasons.append(err)
    env = os.environ.get(ENV_PLUGIN)
    if env and not Path(env).expanduser().is_file():
        reasons.append(f"${ENV_PLUGIN}={env} is not a file")
    elif not env and not (native_dir() / PLUGIN_FILENAME).is_file():
        reasons.append(
            f"not built: no {PLUGIN_FILENAME} in {native_dir()} "
            "(run `python -m simmim_fast.data.native --build`)"
        )
    return reasons


def build_requirements_missing(*, python: str | None = None) -> list[str]:
    """Every missing piece for :func:`build_plugin` (empty list: a build can be attempted)."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake not found on PATH")
    cxx = os.environ.get("CXX")
    if not (cxx and shutil.which(cxx)) and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("no C++ compiler found (c++, g++, clang++ or $CXX)")
    if not (source_dir() / "CMakeLists.txt").is_file() or not (source_dir() / "kernels").is_dir():
        missing.append(f"no source tree: {source_dir()} has no CMakeLists.txt + kernels/ (needs a source checkout)")
    py = python or sys.executable
    if py == sys.executable:
        err = _dali_import_error()
        if err:
            missing.append(err)
    return missing


def build_plugin(
    *,
    build_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    cuda: bool | None = None,
    python: str | None = None,
    jobs: int | None = None,
    cmake_args: Sequence[str] = (),
    timeout_s: float = 900.0,
    quiet: bool = True,
) -> Path:
    """Configure and build the plugin with CMake; returns the path of the built library.

    Args:
        build_dir: CMake build folder (default ``<source>/build/native``).
        output_dir: where the ``.so`` goes (default :func:`native_dir`).
        cuda: ``True`` build the CUDA backend (fails without nvcc), ``False`` CPU only,
            ``None`` (default) the CUDA backend when CMake finds nvcc.
        python: interpreter whose DALI is built against (default this one).
        jobs: parallel build jobs (default: CPU count).
        cmake_args: extra configure arguments (e.g. ``-DCMAKE_CUDA_ARCHITECTURES=90``).
        quiet: capture CMake's output (shown in the error on failure) instead of streaming it.

    Raises ``RuntimeError`` (with the missing pieces or CMake's output) when the build cannot run or fails.
    """
    if cuda is not None and not isinstance(cuda, bool):
        raise TypeError(f"cuda: expected True, False or None, got {cuda!r}")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs: expected a positive int, got {jobs!r}")
    py = python or sys.executable
    missing = build_requirements_missing(python=py)
    if missing:
        raise RuntimeError("cannot build the native DALI plugin: " + "; ".join(missing))
    src = source_dir()
    bdir = Path(build_dir) if build_dir is not None else src / "build" / "native"
    odir = Path(output_dir) if output_dir is not None else native_dir()
    bdir.mkdir(parents=True, exist_ok=True)
    configure = [
        "cmake", "-S", str(src), "-B", str(bdir),
        f"-DPython3_EXECUTABLE={py}",
        f"-DSIMMIM_FAST_NATIVE_OUTPUT_DIR={odir.resolve()}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    if isinstance(cmake_args, (str, bytes)) or not all(isinstance(x, str) for x in cmake_args):
        raise TypeError(f"cmake_args: expected a sequence of strings, got {cmake_args!r}")
    configure.extend(cmake_args)
    if cuda is False:
        configure.append("-DSIMMIM_FAST_WITH_CUDA=OFF")
    elif cuda is True:
        configure.append("-DSIMMIM_FAST_WITH_CUDA=ON")
    build = ["cmake", "--build", str(bdir), "-j", str(jobs or os.cpu_count() or 1)]
    for cmd in (configure, build):
        res = subprocess.run(cmd, capture_output=quiet, text=True, timeout=timeout_s)
        if res.returncode != 0:
            out = ((res.stdout or "") + (res.stderr or ""))[-4000:] if quiet else "(output above)"
            raise RuntimeError(f"native plugin build failed: `{' '.join(cmd)}` exited {res.returncode}:\n{out}")
    if cuda is True:
        cache = (bdir / "CMakeCache.txt").read_text(errors="replace")
        if "CMAKE_CUDA_COMPILER:" not in cache or "CMAKE_CUDA_COMPILER:FILEPATH=CMAKE_CUDA_COMPILER-NOTFOUND" in cache:
            raise RuntimeError("native plugin build: cuda=True but CMake found no CUDA compiler (nvcc)")
    lib = odir / PLUGIN_FILENAME
    if not lib.is_file():
        raise RuntimeError(f"native plugin build finished but {lib} does not exist")
    return lib


def loaded_plugin() -> Path | None:
    """The plugin file loaded into this process, or ``None``."""
    return _loaded


def load_plugin(path: str | os.PathLike | None = None) -> Path:
    """Load the plugin into DALI once per process; returns the loaded file.

    ``path=None`` loads :func:`find_plugin`'s file. Calling again with the same file (or ``None``)
    returns it; asking for a different file once one is loaded raises ``RuntimeError`` (a second copy
    would abort the process). A missing file raises ``FileNotFoundError`` listing every reason.
    """
    global _loaded
    with _lock:
        want = Path(path).expanduser() if path is not None else None
        if _loaded is not None:
            if want is None or want.resolve() == _loaded:
                return _loaded
            raise RuntimeError(
                f"path: the native DALI plugin is already loaded from {_loaded}; loading a second copy "
                f"({want.resolve()}) would abort the process (DALI: operator already registered)"
            )
        if want is None:
            want = find_plugin()
            if want is None:
                raise FileNotFoundError("native DALI plugin not available: " + "; ".join(plugin_unavailable_reasons()))
        if not want.is_file():
            raise FileNotFoundError(f"path: native DALI plugin {want} is not a file")
        err = _dali_import_error()
        if err:
            raise RuntimeError(f"cannot load the native DALI plugin: {err}")
        import nvidia.dali.backend as dali_backend
        import nvidia.dali.plugin_manager as plugin_manager

        if _SCHEMA_NAME in dali_backend.RegisteredCPUOps():
            # Registered by code outside this module: a second copy would abort the process.
            raise RuntimeError(
                f"the DALI operator {_SCHEMA_NAME} is already registered by another copy of the plugin "
                f"(loaded outside simmim_fast.data.native); not loading {want}"
            )
        plugin_manager.load_library(str(want.resolve()))
        _loaded = want.resolve()
        log.debug("loaded native DALI plugin %s", _loaded)
        return _loaded


def try_load_plugin(path: str | os.PathLike | None = None, *, quiet: bool = False) -> Path | None:
    """:func:`load_plugin`, but ``None`` when the plugin is absent (one log line per process unless ``quiet``)."""
    global _absent_logged
    try:
        return load_plugin(path)
    except (FileNotFoundError, RuntimeError) as exc:
        if not quiet and not _absent_logged:
            log.info("native DALI plugin not used: %s", exc)
            _absent_logged = True
        return None


def plugin_backends() -> list[str]:
    """Backends the loaded plugin registered: a subset of ``["cpu", "gpu"]`` (empty if not loaded)."""
    if _loaded is None:
        return []
    import nvidia.dali.backend as dali_backend

    out = []
    if _SCHEMA_NAME in dali_backend.RegisteredCPUOps():
        out.append("cpu")
    if _SCHEMA_NAME in dali_backend.RegisteredGPUOps():
        out.append("gpu")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simmim_fast.data.native",
        description="Build or inspect the native DALI plugin (SimmimMask operator).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--build", action="store_true", help="configure and build with CMake into simmim_fast/_native/")
    mode.add_argument("--status", action="store_true", help="report whether the plugin is found and loadable (default)")
    parser.add_argument("--no-cuda", action="store_true", help="build the CPU backend only")
    parser.add_argument("--build-dir", default=None, help="CMake build folder (default <source>/build/native)")
    parser.add_argument("--output-dir", default=None, help="where the .so goes (default simmim_fast/_native)")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if args.build:
        try:
            lib = build_plugin(build_dir=args.build_dir, output_dir=args.output_dir,
                               cuda=False if args.no_cuda else None, jobs=args.jobs, quiet=False)
        except (RuntimeError, ValueError, TypeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"built {lib}")
        return 0
    path = find_plugin()
    reasons = plugin_unavailable_reasons()
    print(f"plugin file: {path or 'not found'}")
    for r in reasons:
        print(f"  - {r}")
    if path is not None and not reasons:
        try:
            load_plugin(path)
            print(f"loads: yes (backends: {', '.join(plugin_backends())}; op nvidia.dali.fn.{OP_NAME})")
        except Exception as exc:
            print(f"loads: no ({type(exc).__name__}: {exc})")
            return 1
    return 0 if path is not None and not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
