"""Re-save a pickled checkpoint that simmim-fast refuses to unpickle as safetensors + JSON, once, on trust.

    python -m simmim_fast.convert --trust-pickle IN.pth OUT.safetensors

simmim-fast reads ``.pt``/``.pth`` files as data only (``simmim_fast.serialization``): a file that needs
any other class is refused, because unpickling it could run code. This command does the one full
unpickle, for a file you trust (``--trust-pickle`` is required and says so), and writes the weights as
``.safetensors`` with the rest (e.g. an official yacs config) as JSON metadata. Every command then
reads the new file without any pickle. The state dict is taken from ``model``/``state_dict``/``module``
(official layout, read back as an official checkpoint) or from the top level.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


def plain(obj: Any, depth: int = 0) -> Any:
    """JSON-able copy of configuration data (mappings, sequences, scalars); anything else as its repr."""
    if depth > 20:
        return repr(obj)
    if isinstance(obj, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    if hasattr(obj, "__dict__") and not callable(obj):
        return plain(vars(obj), depth + 1)
    return repr(obj)


def convert(src: Path, dst: Path) -> dict:
    """Full unpickle of ``src`` (trusted by the caller), write ``dst`` (.safetensors); returns the metadata."""
    from .models.interchange import save_state_dict

    obj = torch.load(src, map_location="cpu", weights_only=False)  # the caller vouched for this file
    if not isinstance(obj, Mapping):
        raise ValueError(f"IN: {src} holds a {type(obj).__name__}, not a checkpoint dictionary")
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), Mapping):
            sd = {str(k): v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}
            if sd:
                meta = {"checkpoint_kind": "official", "source": src.name,
                        "meta": {str(k): plain(v) for k, v in obj.items() if k != key}}
                break
    else:
        sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        meta = {"source": src.name}
    if not sd:
        raise ValueError(f"IN: {src} holds no tensors")
    save_state_dict(sd, dst, metadata=meta)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simmim_fast.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="a .pt/.pth checkpoint that simmim-fast refused to unpickle")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: unpickle INPUT fully (it can run code: only for files you trust)")
    a = p.parse_args(argv)
    src, dst = Path(a.input), Path(a.output)
    if not a.trust_pickle:
        print(f"convert: refusing to unpickle {src} without --trust-pickle (a pickle can run code while it "
              f"loads; pass the flag only for a file you trust)", file=sys.stderr)
        return 2
    if dst.suffix != ".safetensors":
        print(f"convert: OUTPUT must end in .safetensors, got {dst}", file=sys.stderr)
        return 2
    if not src.is_file():
        print(f"convert: INPUT {src} does not exist", file=sys.stderr)
        return 2
    try:
        meta = convert(src, dst)
    except ValueError as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(f"convert: wrote {dst} ({meta.get('checkpoint_kind', 'state_dict')}); read it with any simmim-fast command")
    return 0


if __name__ == "__main__":
    sys.exit(main())
