"""``benchmarks/gpu_evidence.py``: its CPU dry run exercises every section and writes complete evidence.

The dry run (toy sizes, Triton kernels through the interpreter, ``torch.compile`` with the ``eager``
backend) runs once per module in a subprocess (~20-40 s on 2 cores); a second, instant run checks
``--skip`` and the budget. The GPU numbers themselves can only come from a GPU machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_evidence.py"
OPS = ("mask_token_fill", "pixel_shuffle_head", "masked_l1_loss", "masked_head_loss")


def _load_script():
    """The script as a module (importing it runs nothing and imports neither torch nor triton)."""
    if "gpu_evidence" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_evidence", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_evidence"] = mod  # dataclasses look their module up while the class is created
        spec.loader.exec_module(mod)
    return sys.modules["gpu_evidence"]


def _run(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, json.loads((out / "evidence.json").read_text())


def test_every_section_present_without_error(dry):
    mod = _load_script()
    _, data = dry
    assert data["meta"]["dry_run"] is True
    assert list(data["sections"]) == list(mod.SECTIONS)
    for name, sec in data["sections"].items():
        assert "error" not in sec, (name, sec["error"])
        expected = "skipped" if name == "tests" else "ok"
        assert sec["status"] == expected, (name, sec)
    assert data["sections"]["tests"]["reason"] == "skipped in dry run"


def test_e2e_variants_ran_and_losses_agree(dry):
    _, data = dry
    for section, required in (("e2e", {"official_equiv", "timm_sdpa", "ours"}),
                              ("e2e_compiled", {"ours_compiled", "official_equiv_compiled"})):
        presets = data["sections"][section]["presets"]
        assert len(presets) == 2
        for preset, entry in presets.items():
            variants = entry["variants"]
            assert required <= set(variants), (section, preset, list(variants))
            for name, r in variants.items():
                assert r["status"] == "ok", (section, preset, name, r)
                assert r["img_per_s"] > 0 and r["first_step_s"] > 0
            assert entry["loss_check"]["losses_agree"] is True, entry["loss_check"]
            assert entry["flops"]["forward_per_image"] > 0
    swin = data["sections"]["e2e"]["presets"]["swin_tiny_cpu"]["variants"]
    assert swin["ours"]["masked_head_tokens"] > 0  # the masked-only head ran from the CPU token index
    assert "sdpa_attn" in swin


def test_ops_compare_triton_with_reference(dry):
    _, data = dry
    rows = data["sections"]["ops"]["rows"]
    assert not [r for r in rows if "error" in r or "unavailable" in r]
    for op in OPS:
        for mode in ("fwd", "fwd+bwd"):
            got = {r["backend"]: r for r in rows if r["op"] == op and r["mode"] == mode and r["case"] == "vit_toy"}
            assert {"triton", "reference"} <= set(got), (op, mode)
            assert got["triton"]["us"] > 0 and got["triton"]["speedup_vs_reference"] > 0
            if mode == "fwd":
                assert got["triton"]["max_diff_vs_reference"] <= 1e-4
    cases = {r["case"] for r in rows if r["op"] == "mask_token_fill"}
    assert {"vit_toy_nchw_view", "vit_toy_nchw_view_contiguous"} <= cases
    assert all("gbps" in r for r in rows if r["op"] != "masked_head_loss")


def test_attention_rows_cover_backends(dry):
    _, data = dry
    rows = data["sections"]["attention"]["rows"]
    assert not [r for r in rows if "error" in r]
    for shifted in (False, True):
        got = {r["backend"]: r for r in rows if r["shifted"] is shifted}
        assert {"timm", "timm_sdpa", "math", "sdpa", "xformers", "auto"} <= set(got)
        assert "unavailable" in got["xformers"]  # no CUDA: recorded with its reason, not an error
        assert got["sdpa"]["fwd+bwd"]["us"] > 0


def test_summary_written(dry):
    out, _ = dry
    text = (out / "summary.md").read_text()
    assert "DRY RUN" in text
    for title in ("## Ceilings", "## End-to-end training step", "## Ops", "## Window attention"):
        assert title in text


def test_skip_and_budget(tmp_path):
    proc = _run(tmp_path, "--budget", "0", "--skip", "e2e", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sections = json.loads((tmp_path / "evidence.json").read_text())["sections"]
    assert sections["e2e"] == {"status": "skipped", "reason": "skipped: --skip"}
    for name, sec in sections.items():
        if name != "e2e":
            assert sec["status"] == "skipped" and sec["reason"].startswith("skipped: budget"), (name, sec)
    assert (tmp_path / "summary.md").exists()


def test_lost_cuda_context_continues_in_a_fresh_process(tmp_path):
    """After a sticky CUDA error (simulated here) the remaining sections run in a new process, same file."""
    proc = _run(tmp_path, "--only", "env,ceilings,tests", "--simulate-context-loss", "ceilings", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "continuing ['tests'] in a fresh process" in proc.stdout
    data = json.loads((tmp_path / "evidence.json").read_text())
    assert data["meta"]["cuda_context_lost"][0]["after_section"] == "ceilings"
    assert len(data["meta"]["relaunches"]) == 1
    sections = data["sections"]
    assert sections["env"]["status"] == "ok" and sections["ceilings"]["status"] == "ok"  # kept from the first process
    assert sections["tests"]["reason"] == "skipped in dry run"  # run by the second
    assert sections["e2e"]["reason"] == "skipped: not in --only"


def test_section_selection():
    mod = _load_script()
    args = mod.parse_args(["--only", "ops,e2e,tests", "--skip", "tests"])
    assert args.selected == ["e2e", "ops"]
    assert mod.parse_args([]).selected == list(mod.SECTIONS)
    with pytest.raises(SystemExit):
        mod.parse_args(["--skip", "nonsense"])
