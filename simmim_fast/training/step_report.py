"""Which parts of the fast training step a default ``python -m simmim_fast.train`` run uses here, and why not.

``fast_step_report()`` answers for the default device (CUDA when available, else CPU), one process,
``--precision auto``, no accumulation, the official mask generator on the default preset's geometry:
``torch.compile`` mode, the AdamW implementation, the grad-norm clip, CUDA graphs and the masked-only
head's static token count. ``python -m simmim_fast.info`` prints it. Never raises: a failing probe
becomes its reason.
"""
from __future__ import annotations


def fast_step_report(device: str | None = None) -> dict:
    """``{part: {"active": bool, "what": str, "reasons": [str]}}`` for a default run on ``device``."""
    out: dict = {}
    try:
        import torch

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except Exception as exc:
        return {"error": f"torch not importable: {type(exc).__name__}: {exc}"}

    def part(name, fn):
        try:
            out[name] = fn()
        except Exception as exc:  # a probe bug must not take the report down
            out[name] = {"active": False, "what": "", "reasons": [f"probe failed: {type(exc).__name__}: {exc}"]}

    def compile_part():
        from .compile import resolve_compile_mode

        mode, why = resolve_compile_mode("auto", dev)
        return {"active": mode != "off", "what": f"--compile auto -> {mode}", "reasons": [why] if why else []}

    def adamw_part():
        from .optim import adamw_implementation

        p = torch.empty(1, device="meta")
        impl = "fused" if dev.type == "cuda" else adamw_implementation([p])
        return {"active": impl == "fused", "what": f"AdamW {impl}, grad-norm clip with foreach kernels",
                "reasons": [] if impl == "fused" else [f"fused AdamW is used on CUDA; {dev.type} runs foreach"]}

    def graphs_part():
        from .cuda_graphs import cuda_graph_reasons, resolve_cuda_graphs

        precision = "bf16" if dev.type == "cuda" else "fp32"
        use, reasons = resolve_cuda_graphs(
            "auto", cuda_graph_reasons(device=dev, precision=precision, distributed=False, accum_steps=1))
        return {"active": use, "what": "--cuda-graphs auto -> " + ("on" if use else "off"), "reasons": reasons}

    def head_part():
        from ..data.masking import MaskGenerator
        from ..models import DEFAULT_PRESET, get_preset
        from ..ops.masked_head import static_head_count

        preset = get_preset(DEFAULT_PRESET)
        r, patch = preset.recipe, preset.encoder.get("patch_size", 16)
        depths = preset.encoder.get("depths")
        stride = patch * 2 ** (len(depths) - 1) if depths else patch  # Swin: patch merging per stage
        gen = MaskGenerator(input_size=r.img_size, mask_patch_size=r.mask_patch_size, model_patch_size=patch,
                            mask_ratio=r.mask_ratio)
        n, why = static_head_count(batch_size=r.batch_size, grid=(r.img_size // stride,) * 2,
                                   mask_grid=(gen.rand_size,) * 2, masked_cells=gen.mask_count)
        what = (f"masked-only head, static count {n} tokens at batch {r.batch_size} ({DEFAULT_PRESET})" if n is not None
                else "full head")
        return {"active": n is not None, "what": what, "reasons": [why] if why else []}

    part("compile", compile_part)
    part("optimizer", adamw_part)
    part("cuda_graphs", graphs_part)
    part("masked_head", head_part)
    out["device"] = str(dev)
    return out


def format_fast_step(report: dict) -> list[str]:
    """Report lines of :func:`fast_step_report`."""
    lines = [f"training step (a default train run on {report.get('device', '?')})"]
    if report.get("error"):
        return lines + [f"  {report['error']}"]
    for name in ("compile", "optimizer", "cuda_graphs", "masked_head"):
        r = report.get(name) or {}
        lines.append(f"  {name:<20} {'yes' if r.get('active') else 'no '}  {r.get('what', '')}")
        lines.extend(f"      - {x}" for x in r.get("reasons", []))
    return lines
