"""Every Triton kernel variant the project launches compiles for sm_90 and sm_80, without a GPU.

``python -m simmim_fast.kernel_check all --op-tests`` records the launches of one training step of
each preset (three precisions) and of the Triton op tests under the interpreter, then compiles each
distinct signature through Triton's JIT with a stub driver for the GPU targets and reads registers and
spills from ``ptxas -v``. CI runs this on both legs, i.e. with triton 3.8 and with triton 3.6.
The unit tests below show the check can fail: a compile error and a spill are reported as failures.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simmim_fast import kernel_check
from simmim_fast.ops import _common, launch_log

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not _common.HAS_TRITON, reason="needs triton")

KERNELS = {"_fill_fwd_kernel", "_fill_fwd_cf_kernel", "_fill_bwd_kernel", "_loss_kernel", "_shuffle_kernel",
           "_integral_kernel", "_targets_kernel",  # these two: normalised targets (ops/norm_target.py)
           "_fwd_kernel", "_bwd_dq_kernel", "_bwd_kv_kernel"}  # Swin window attention (ops/window_attention.py)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_check") / "report.json"
    r = subprocess.run([sys.executable, "-m", "simmim_fast.kernel_check", "all", "--op-tests", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return r.returncode, r.stdout, json.loads(out.read_text())


def test_every_variant_compiles_for_sm90_and_sm80_without_spills(report):
    rc, stdout, rep = report
    assert rep["failures"] == [], "\n".join(rep["failures"])
    assert rc == 0, stdout[-3000:]
    variants = rep["variants"]
    assert {v["arch"] for v in variants} == {90, 80}
    assert {v["kernel"].split(":")[1] for v in variants} == KERNELS
    assert all(v["ok"] and v["registers"] > 0 for v in variants)
    assert len(variants) >= 2 * 100  # the op tests alone launch over a hundred distinct signatures


def test_main_kernels_use_vector_loads(report):
    """The layouts of the real steps let the compiler vectorise: Swin's contiguous tokens (fill, BLOCK_C
    128), ViT's NCHW-viewed tokens (the channels-first fill reads along tokens), the loss rows."""
    _, _, rep = report
    sm90 = [v for v in rep["variants"] if v["arch"] == 90]
    swin_fill = [v for v in sm90 if v["kernel"].endswith(":_fill_fwd_kernel") and v["constexprs"]["BLOCK_C"] == 128]
    assert swin_fill and all(any(k.startswith("v4") for k in v["memory"]["ld"]) for v in swin_fill)
    cf = [v for v in sm90 if v["kernel"].endswith(":_fill_fwd_cf_kernel") and v["constexprs"]["HW"] == 196]
    assert cf, "the ViT step did not launch the channels-first fill"
    assert all(any(k.startswith("v") for k in v["memory"]["ld"]) for v in cf), [v["memory"] for v in cf]
    assert all(any(k.startswith("v") for k in v["memory"]["st"]) for v in cf), [v["memory"] for v in cf]
    big_loss = [v for v in sm90 if v["kernel"].endswith(":_loss_kernel") and v["constexprs"]["BLOCK_P"] >= 256]
    assert big_loss and all(v["load_vectorised_fraction"] > 0 for v in big_loss)


# ----------------------------------------------------------------------------------------------------
# the check's own parts


def test_signature_key_keeps_what_triton_specialises_on():
    rec = launch_log.describe_launch(type("K", (), {"__module__": "m", "__name__": "k"}), (4,),
                                     (torch.zeros(8), 32, 7, 1, 1.5), {"BLOCK": 64, "num_warps": 4})
    assert rec["constexprs"] == {"BLOCK": 64} and rec["options"] == {"num_warps": 4}
    same = json.loads(json.dumps(rec))
    same["args"][1]["value"] = 48  # another multiple of 16
    other = json.loads(json.dumps(rec))
    other["args"][2]["value"] = 16  # 7 -> a multiple of 16: another compiled variant
    misaligned = json.loads(json.dumps(rec))
    misaligned["args"][0]["align16"] = False
    assert launch_log.signature_key(same) == launch_log.signature_key(rec)
    assert launch_log.signature_key(other) != launch_log.signature_key(rec)
    assert launch_log.signature_key(misaligned) != launch_log.signature_key(rec)
    assert len(launch_log.unique([rec, same, other])) == 2


def test_record_without_executing_leaves_outputs_unwritten(monkeypatch):
    if not _common.INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs the interpreter or a GPU")
    from simmim_fast import ops

    dev = "cuda" if torch.cuda.is_available() and not _common.INTERPRET else "cpu"
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    tokens = torch.randn(1, 4, 4, 8, device=dev)
    with launch_log.record(execute=False) as log:
        out = ops.mask_token_fill(tokens, torch.zeros(1, 2, 2, device=dev), torch.zeros(8, device=dev),
                                  backend="triton")
    assert [r["kernel"].split(":")[1] for r in log] == ["_fill_fwd_kernel"]
    assert torch.isnan(out).all()  # recorded, not run
    assert not launch_log.active()


def test_compile_error_and_spills_are_failures():
    """A launch that cannot compile (a non-power-of-two block) is reported, not raised."""
    fill = [r for r in json.loads(json.dumps(_one_fill_record()))]
    fill[0]["constexprs"]["BLOCK_C"] = 24  # tl.arange needs a power of two
    code = ("import json, sys; from simmim_fast import kernel_check as k; "
            "res = k.compile_all(json.loads(sys.argv[1]), [90]); print(json.dumps(res))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(fill)], cwd=REPO, capture_output=True, text=True,
                       env=_env(TRITON_INTERPRET="0"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res["ok"] and "power of 2" in res["error"].lower().replace("power-of-two", "power of 2")
    assert kernel_check.failures([res])
    spill = dict(res, ok=True, spill_stores=8, spill_loads=8, registers=255)
    assert "spills" in kernel_check.failures([spill])[0]
    assert kernel_check.failures([dict(spill, spill_stores=0, spill_loads=0)]) == []


def _one_fill_record():
    return [{
        "kernel": "simmim_fast.ops.mask_token_fill:_fill_fwd_kernel",
        "args": [{"kind": "tensor", "dtype": "bfloat16", "align16": True}, {"kind": "tensor", "dtype": "uint8",
                 "align16": True}, {"kind": "tensor", "dtype": "bfloat16", "align16": True},
                 {"kind": "tensor", "dtype": "bfloat16", "align16": True}]
        + [{"kind": "int", "value": v} for v in (9216, 48, 48, 128, 8, 8, 294912, 6144, 128, 1, 36, 6, 1, 1)],
        "constexprs": {"BLOCK_R": 32, "BLOCK_C": 128}, "options": {"num_warps": 4}, "grid": [288, 1],
    }]


def _env(**kw):
    import os

    return dict(os.environ, **kw)


def test_cli_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "simmim_fast.kernel_check", "collect", "--out", "x.json",
                        "--presets", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "preset" in r.stderr and "swin_base_192" in r.stderr


def test_a_launches_file_cannot_choose_what_to_import():
    """The launches file is data: a record naming any other module is refused before anything is imported."""
    import sys as _sys

    for name in ("os:system", "subprocess:run", "simmim_fast.ops.mask_token_fill:__class__", "evil_module_x:k"):
        with pytest.raises(ValueError, match="not one of this project's kernels|not a Triton kernel"):
            kernel_check._kernel(name)
    assert "evil_module_x" not in _sys.modules
    res = kernel_check.compile_one({"kernel": "os:system", "args": [], "constexprs": {}, "options": {}}, 90)
    assert not res["ok"] and "not one of this project's kernels" in res["error"]
