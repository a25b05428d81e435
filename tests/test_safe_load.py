"""Checkpoints are data: a pickle with a code payload never runs, through any path that loads a file.

Each malicious file would create a marker file if it were unpickled fully (``posix.system`` in a
torch.save file, ``builtins.exec`` in a bare legacy pickle). Every CLI and API entry point that opens a
checkpoint is given it (as a file, and as the newest checkpoint of a run folder): each one must refuse
it with a message naming the class, and the marker must never appear. Our own checkpoints and official
ones (with a yacs config) still load; ``python -m simmim_fast.convert --trust-pickle`` converts a file
one trusts into safetensors that every command reads.
"""
from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from simmim_fast import convert, finetune, linear_probe, probe, serialization, train, visualize
from simmim_fast.models import create_model
from simmim_fast.models import interchange
from simmim_fast.models.interchange import PRETRAIN_FORMAT, read_checkpoint
from simmim_fast.training import checkpoint as ckpt


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evil")
    marker = root / "MARKER"
    model = create_model("swin_tiny_cpu", img_size=64, window_size=2)
    good = {"format": PRETRAIN_FORMAT, "model": model.state_dict(), "step": 1,
            "args": {"preset": "swin_tiny_cpu"}, "plan": {"img_size": 64, "mask_patch_size": 32, "mask_ratio": 0.6}}
    evil_pt = root / "evil.pt"
    torch.save({**good, "payload": _SystemPayload(marker)}, evil_pt)
    bare = root / "bare.pth"
    with open(bare, "wb") as f:
        pickle.dump({"model": {"w": [0.0]}, "payload": _ExecPayload(marker)}, f, protocol=2)
    run = root / "run"
    run.mkdir()
    torch.save({**good, "payload": _SystemPayload(marker)}, run / "checkpoint_00000009.pt")
    img = root / "img.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(img)
    data = root / "data"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (data / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((32, 32, 3), 40 * i + (cls == "a") * 100, np.uint8)).save(data / split / cls / f"{i}.png")
    return types.SimpleNamespace(root=root, marker=marker, evil=evil_pt, bare=bare, run=run, img=img, data=data,
                                 good=good)


def _assert_refused(files, rc, capsys):
    err = capsys.readouterr().err
    assert not files.marker.exists(), "the payload ran"
    assert rc != 0
    assert "posix.system" in err or "builtins.exec" in err, err[-2000:]  # refused, naming the class


@pytest.mark.parametrize("which", ["evil", "bare"])
def test_api_paths_refuse_and_never_run_the_payload(files, which):
    path = getattr(files, which)
    with pytest.raises(serialization.UnsafeCheckpointError) as e:
        serialization.load(path)
    assert ("posix.system" if which == "evil" else "builtins.exec") in str(e.value)
    assert "--trust-pickle" in str(e.value)
    with pytest.raises(ValueError):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError):
        read_checkpoint(path)
    assert ckpt.resumed_settings(str(path), files.root) == {}
    assert not files.marker.exists()


def test_api_run_folder_refuses(files):
    with pytest.raises(ValueError):
        read_checkpoint(files.run)
    assert ckpt.resumed_settings("auto", files.run) == {}
    assert not files.marker.exists()


CLI_CASES = {
    "train --resume FILE": lambda f, t: train.main(["--resume", str(f.evil), "--output", str(t / "o"), "--max-steps", "1",
                                                    "--num-workers", "0"]),
    "train --resume (run folder)": lambda f, t: train.main(["--resume", "--output", str(f.run), "--max-steps", "10",
                                                            "--num-workers", "0"]),
    "finetune --pretrained": lambda f, t: finetune.main(["--preset", "swin_tiny_cpu", "--pretrained", str(f.evil), "--data",
                                                         str(f.data), "--output", str(t / "o"), "--max-steps", "1",
                                                         "--batch-size", "2", "--num-workers", "0"]),
    "finetune --resume FILE": lambda f, t: finetune.main(["--preset", "swin_tiny_cpu", "--resume", str(f.evil), "--data",
                                                          str(f.data), "--output", str(t / "o"), "--max-steps", "1",
                                                          "--batch-size", "2", "--num-workers", "0"]),
    "finetune --eval --pretrained": lambda f, t: finetune.main(["--preset", "swin_tiny_cpu", "--eval", "--pretrained",
                                                                str(f.bare), "--data", str(f.data), "--output",
                                                                str(t / "o"), "--batch-size", "2", "--num-workers", "0"]),
    "visualize --checkpoint FILE": lambda f, t: visualize.main(["--checkpoint", str(f.evil), "--images", str(f.img),
                                                                "--output", str(t / "v.png")]),
    "visualize --checkpoint RUN": lambda f, t: visualize.main(["--checkpoint", str(f.run), "--images", str(f.img),
                                                               "--output", str(t / "v.png")]),
    "probe --checkpoint FILE": lambda f, t: probe.main(["--checkpoint", str(f.bare), "--images", str(f.img)]),
    "probe --all": lambda f, t: probe.main(["--checkpoint", str(f.run), "--all", "--images", str(f.img)]),
    "linear_probe --pretrained": lambda f, t: linear_probe.main(["--pretrained", str(f.evil), "--data", str(f.data),
                                                                 "--output", str(t / "o"), "--num-workers", "0"]),
    "linear_probe --resume": lambda f, t: linear_probe.main(["--pretrained", str(f.evil), "--resume", str(f.bare),
                                                             "--data", str(f.data), "--output", str(t / "o"),
                                                             "--num-workers", "0"]),
    "interchange export": lambda f, t: interchange.main(["export", "--checkpoint", str(f.evil), "--output",
                                                         str(t / "x.safetensors")]),
    "interchange convert": lambda f, t: interchange.main(["convert", "--checkpoint", str(f.bare), "--output",
                                                          str(t / "c.pt")]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_paths_refuse_and_never_run_the_payload(files, case, tmp_path, capsys):
    try:
        rc = CLI_CASES[case](files, tmp_path)
    except SystemExit as e:  # argparse-level exits
        rc = e.code
    _assert_refused(files, rc, capsys)


def test_our_and_official_checkpoints_still_load(files, tmp_path):
    ours = tmp_path / "ours.pt"
    torch.save({**files.good, "rng": ckpt.rng_state()}, ours)
    state = ckpt.load_checkpoint(ours)
    assert isinstance(state["rng"]["numpy"][1], np.ndarray) and state["step"] == 1
    assert read_checkpoint(ours).kind == "pretrain"


def test_convert_requires_trust_and_yields_a_loadable_file(files, tmp_path, capsys):
    out = tmp_path / "conv.safetensors"
    assert convert.main([str(files.evil), str(out)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not out.exists()
    # a trusted official-style file (yacs config) converts and reads back as an official checkpoint
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode, pkg.config = CfgNode, mod
    sys.modules["yacs"], sys.modules["yacs.config"] = pkg, mod
    try:
        src = tmp_path / "official.pth"
        torch.save({"model": {"encoder.patch_embed.proj.weight": torch.ones(2, 3)},
                    "config": CfgNode(DATA=CfgNode(IMG_SIZE=192)), "epoch": 99}, src)
        assert convert.main(["--trust-pickle", str(src), str(out)]) == 0
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]
    ck = read_checkpoint(out)
    assert ck.kind == "official" and ck.meta["config"]["DATA"]["IMG_SIZE"] == 192 and ck.meta["epoch"] == 99
    assert torch.equal(ck.state_dict["encoder.patch_embed.proj.weight"], torch.ones(2, 3))
