"""The native DALI plugin: CMake build (CPU part in CI; the CUDA part compiled when nvcc exists), loading
rules, and the SimmimMask operator's masks (exact count, cell alignment, seed determinism, same
statistics as MaskGenerator). GPU checks skip without CUDA.

The plugin is built once per session into a temp folder (``fresh_plugin``) and loaded before anything
else could load another copy (a second copy aborts the process); test_dali.py uses the same helper.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from simmim_fast import MaskGenerator, avg_dist  # noqa: E402
from simmim_fast.data import native  # noqa: E402

CUDA = torch.cuda.is_available()
WITH_CUDA = CUDA and shutil.which("nvcc") is not None  # the session's build includes the CUDA part
_BUILT: dict[str, object] = {}


def _toolchain_missing() -> list[str]:
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake not found")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        missing.append("no C++ compiler")
    return missing


def fresh_plugin(tmp_path_factory) -> "os.PathLike":
    """Build the plugin from kernels/ (CPU part; also CUDA on a GPU machine) once, load it, return its path."""
    if "path" in _BUILT:
        return _BUILT["path"]
    missing = _toolchain_missing()
    if missing:
        pytest.skip("cannot build the native plugin here: " + "; ".join(missing))
    root = tmp_path_factory.mktemp("native_plugin")
    lib = native.build_plugin(build_dir=root / "build", output_dir=root / "out", cuda=WITH_CUDA)
    loaded = native.loaded_plugin()
    if loaded is None:
        native.load_plugin(lib)
    elif loaded != lib.resolve():
        pytest.fail(f"another copy of the plugin ({loaded}) was loaded before the fresh build; cannot test {lib}")
    _BUILT["path"] = lib.resolve()
    return _BUILT["path"]


@pytest.fixture(scope="session")
def plugin(tmp_path_factory):
    return fresh_plugin(tmp_path_factory)


def run_masks(*, batch=8, iterations=1, seed=0, device="cpu", **kw) -> np.ndarray:
    """``(iterations * batch, G, G)`` uint8 masks of fn.simmim_mask in a CPU-only (or GPU) pipeline.

    ``seed`` is the pipeline's; the operator derives its own from it unless ``kw`` holds ``seed``
    (here called ``op_seed``).
    """
    if "op_seed" in kw:
        kw["seed"] = kw.pop("op_seed")
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=batch, num_threads=2, device_id=0 if device == "gpu" else None, seed=seed)
    with pipe:
        pipe.set_outputs(getattr(fn, native.OP_NAME)(device=device, **kw))
    pipe.build()
    out = []
    for _ in range(iterations):
        (masks,) = pipe.run()
        if device == "gpu":
            masks = masks.as_cpu()
        out.extend(np.array(masks[i]) for i in range(batch))
    return np.stack(out)


def gen_kwargs(g: MaskGenerator) -> dict:
    return dict(input_size=g.input_size, mask_patch_size=g.mask_patch_size, model_patch_size=g.model_patch_size,
                mask_count=g.mask_count, strategy=g.strategy)


def coarse(masks: np.ndarray, scale: int) -> np.ndarray:
    return masks[:, ::scale, ::scale]


# --------------------------------------------------------------------------- build and load


def test_cmake_builds_and_loads_cpu_part(plugin):
    assert os.path.isfile(plugin) and native.loaded_plugin() == plugin
    backends = native.plugin_backends()
    assert "cpu" in backends
    assert ("gpu" in backends) == WITH_CUDA  # CI builds the CPU part only
    from nvidia.dali import fn

    assert hasattr(fn, native.OP_NAME)


def test_load_once_rules(plugin, tmp_path):
    assert native.load_plugin(plugin) == plugin  # same file again: no-op
    assert native.load_plugin() == plugin  # no path: the loaded one
    copy = tmp_path / native.PLUGIN_FILENAME
    shutil.copy(plugin, copy)
    with pytest.raises(RuntimeError, match="already loaded"):
        native.load_plugin(copy)  # refused before DALI sees it (a second copy would abort)
    assert native.try_load_plugin(copy, quiet=True) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA part is not built")
def test_cmake_compiles_cuda_part(plugin, tmp_path):
    """The .cu compiles and links against DALI (one architecture to keep CI short; not loaded: no second copy)."""
    lib = native.build_plugin(build_dir=tmp_path / "b", output_dir=tmp_path / "o", cuda=True,
                              cmake_args=["-DCMAKE_CUDA_ARCHITECTURES=90"])
    data = lib.read_bytes()
    assert b".nv_fatbin" in data  # device code (sm_90) linked in
    assert b".nv_fatbin" not in open(plugin, "rb").read() or WITH_CUDA  # the CPU-only build has none


def test_build_reports_missing_tools(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(native.shutil, "which", lambda name: None if name == "cmake" else real_which(name))
    missing = native.build_requirements_missing()
    assert any("cmake" in m for m in missing)
    with pytest.raises(RuntimeError, match="cmake not found"):
        native.build_plugin(build_dir="/nonexistent/never-created")
    with pytest.raises(TypeError, match="cuda"):
        native.build_plugin(cuda="yes")


def test_status_cli(plugin, monkeypatch, capsys):
    monkeypatch.setenv(native.ENV_PLUGIN, str(plugin))
    assert native.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "loads: yes" in out and "cpu" in out
    monkeypatch.setenv(native.ENV_PLUGIN, "/nonexistent/lib.so")
    assert native.find_plugin() is None


# --------------------------------------------------------------------------- the operator's masks

SIZES = [(192, 32, 4), (224, 32, 4), (96, 32, 8), (224, 16, 16), (64, 64, 4)]


@pytest.mark.parametrize("strategy", ["random", "square", "block"])
@pytest.mark.parametrize("size", SIZES)
def test_exact_count_and_alignment(plugin, strategy, size):
    g = MaskGenerator(*size, mask_ratio=0.6, strategy=strategy)
    m = run_masks(batch=6, iterations=2, **gen_kwargs(g))
    assert m.shape == (12, g.grid_size, g.grid_size) and m.dtype == np.uint8
    assert set(np.unique(m).tolist()) <= {0, 1}
    c = coarse(m, g.scale)
    up = c.repeat(g.scale, axis=1).repeat(g.scale, axis=2)
    np.testing.assert_array_equal(m, up)  # each mask cell is a constant scale x scale block
    np.testing.assert_array_equal(c.reshape(len(c), -1).sum(1), g.mask_count)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 1.0])
def test_ratio_edges_and_count_formula(plugin, ratio):
    g = MaskGenerator(192, 32, 4, mask_ratio=ratio)
    # mask_ratio only (float32 in DALI) gives the official count for these ratios ...
    m = run_masks(batch=4, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=ratio)
    np.testing.assert_array_equal(coarse(m, 8).reshape(4, -1).sum(1), g.mask_count)
    if ratio == 0.0:
        assert m.sum() == 0
    if ratio == 1.0:
        assert m.min() == 1


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 1 / 3])
@pytest.mark.parametrize("size", [(192, 32, 4), (224, 32, 4)])
def test_square_is_mask_generator_square(plugin, size, ratio):
    g = MaskGenerator(*size, mask_ratio=ratio, strategy="square")
    m = run_masks(batch=2, **gen_kwargs(g))
    np.testing.assert_array_equal(m[0], g().astype(np.uint8))
    np.testing.assert_array_equal(m[1], g().astype(np.uint8))


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_seed_determinism(plugin, strategy):
    kw = gen_kwargs(MaskGenerator(192, 32, 4, 0.6, strategy=strategy))
    a = run_masks(batch=4, iterations=3, seed=11, **kw)
    b = run_masks(batch=4, iterations=3, seed=11, **kw)
    c = run_masks(batch=4, iterations=3, seed=12, **kw)
    np.testing.assert_array_equal(a, b)  # same pipeline seed: same masks
    assert not np.array_equal(a, c)
    # samples within a batch and across iterations differ
    assert len({x.tobytes() for x in a}) == len(a)


def test_random_cells_uniform(plugin):
    g = MaskGenerator(192, 32, 4, 0.6)
    c = coarse(run_masks(batch=64, iterations=8, seed=3, **gen_kwargs(g)), g.scale).reshape(512, -1)
    freq = c.mean(0)  # each of the 36 cells: ~22/36; binomial sd 0.022 over 512 masks
    assert np.abs(freq - g.mask_count / g.token_count).max() < 0.1


@pytest.mark.parametrize("strategy", ["random", "block"])
def test_same_statistics_as_mask_generator(plugin, strategy):
    """AvgDist (SimMIM paper) of the operator's masks matches MaskGenerator's for the same strategy."""
    g = MaskGenerator(192, 32, 4, 0.6, strategy=strategy)
    ours = run_masks(batch=32, iterations=2, seed=5, **gen_kwargs(g))
    ref = g.generate(64, generator=torch.Generator().manual_seed(5)).numpy()
    d_ours = np.mean([avg_dist(m.repeat(4, 0).repeat(4, 1)) for m in ours])
    d_ref = np.mean([avg_dist(m.repeat(4, 0).repeat(4, 1)) for m in ref])
    assert abs(d_ours - d_ref) / d_ref < 0.12, (d_ours, d_ref)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(input_size=100, mask_patch_size=32), "input_size"),
        (dict(mask_patch_size=32, model_patch_size=5), "mask_patch_size"),
        (dict(strategy="stripes"), "strategy"),
        (dict(mask_count=37), "mask_count"),
        (dict(mask_ratio=1.5), "mask_ratio"),
    ],
)
def test_bad_arguments_name_the_argument(plugin, kwargs, needle):
    with pytest.raises(RuntimeError, match=needle):
        run_masks(batch=1, **kwargs)


# --------------------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.skipif(not WITH_CUDA, reason="needs a CUDA device and nvcc")
@pytest.mark.parametrize("strategy", ["random", "square", "block"])
@pytest.mark.parametrize("size", [(192, 32, 4), (224, 32, 4), (224, 16, 16)])
def test_gpu_backend_equals_cpu_backend(plugin, strategy, size):
    kw = gen_kwargs(MaskGenerator(*size, mask_ratio=0.6, strategy=strategy))
    cpu = run_masks(batch=16, iterations=2, op_seed=9, device="cpu", **kw)
    gpu = run_masks(batch=16, iterations=2, op_seed=9, device="gpu", **kw)
    np.testing.assert_array_equal(gpu, cpu)
