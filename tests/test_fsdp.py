"""FSDP (training.fsdp), sharded checkpoints (training.sharded_checkpoint) and the memory planner (training.planner).

CPU only, gloo. One torchrun run (2 processes, ``--strategy fsdp``, accumulation 2) against one process at the
same total batch: the same losses and gradient norms; its sharded checkpoint resumed by ONE process gives the
same next loss; its consolidated model equals the one-process weights. In-process tests use a 1-rank gloo
group: FSDP per block against the unsharded model for each block kind (Swin, SwinV2, BEiT), DCP round trips,
malicious checkpoint folders, the planner against an independent accounting and ``--strategy auto``'s choice.

Tolerances (``training.fsdp.TOLERANCES``): fp32 runs are the same computation in another order (sums over two
ranks, per-unit reduce-scatter): losses rtol 1e-5. bf16 is compared with what it replaces: its gradients must
be as close to the fp32 gradients as autocast alone gets (DDP + autocast), within 10 %.
"""
from __future__ import annotations

import copy
import csv
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from simmim_fast import train
from simmim_fast.models import create_model
from simmim_fast.models import interchange
from simmim_fast.serialization import UnsafeCheckpointError
from simmim_fast.training import checkpoint as ckpt
from simmim_fast.training import fsdp
from simmim_fast.training import sharded_checkpoint as sharded
from simmim_fast.training.distributed import DistInfo
from simmim_fast.training.memory import estimate_step_memory
from simmim_fast.training.optim import build_optimizer
from simmim_fast.training.planner import STRATEGIES, choose_strategy, shard_bytes, strategy_memory

CPU = torch.device("cpu")
ONE = DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)


@pytest.fixture
def group():
    """A 1-rank gloo process group for this test (FSDP2 and DCP collectives over one process)."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run: Path) -> dict[int, dict]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def _tiny(preset: str, **kw):
    size = {"swin_tiny_cpu": dict(img_size=64, window_size=4),
            "swinv2_tiny_cpu": dict(img_size=64, window_size=4, depths=(1, 1, 2, 1)),
            "vit_tiny_cpu": dict(img_size=64)}[preset]
    return create_model(preset, ops_backend="reference", norm_target=None, **size, **kw)


def _batch(model, n=2):
    g = torch.Generator().manual_seed(1)
    s = model.img_size[0]
    images = torch.randn(n, 3, s, s, generator=g)
    cells = 32 // model.patch_size
    gh, gw = model.encoder.grid_size
    return images, torch.rand(n, gh // cells, gw // cells, generator=g) < 0.6


def _grads(model) -> torch.Tensor:
    return torch.cat([fsdp.local_tensor(p.grad).flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------------------------
# 2 processes (torchrun, gloo) against one


def test_two_process_fsdp_matches_one_process_and_resumes_with_one(tmp_path, cache_env):
    """2 ranks x batch 1 x accumulation 2 under FSDP take the steps of 1 process x batch 4 on the same samples;
    the sharded checkpoint of step 2 (written by 2 processes) resumed by 1 process gives the same step 3."""
    common = ["--max-steps", "3", "--save-every", "2", "--log-every", "1", "--keep-checkpoints", "0",
              "--img-size", "96", "--num-workers", "0", "--seed", "3", "--threads", "1"]
    run = tmp_path / "fsdp"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "simmim_fast.train", *common, "--batch-size", "1", "--accum-steps", "2", "--strategy", "fsdp",
         "--output", str(run)],
        env=cache_env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(s, p.name) for s, p in ckpt.list_checkpoints(run)] == [(2, "checkpoint_00000002.dcp"),
                                                                    (3, "checkpoint_00000003.dcp")]
    two = run / "checkpoint_00000002.dcp"
    assert sorted(p.name for p in two.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "simmim_fast.pt"]
    meta = sharded.read_meta(two)
    assert meta["world_size"] == 2 and meta["sharded"] and meta["step"] == 2 and len(meta["rng"]) == 2

    single = tmp_path / "single"
    assert train.main([*common, "--batch-size", "4", "--output", str(single)]) == 0
    fs, one = _rows(run), _rows(single)
    for s in (1, 2, 3):
        assert float(fs[s]["loss"]) == pytest.approx(float(one[s]["loss"]), rel=1e-5), s
        assert float(fs[s]["grad_norm"]) == pytest.approx(float(one[s]["grad_norm"]), rel=1e-4), s
        assert float(fs[s]["lr"]) == pytest.approx(float(one[s]["lr"]), rel=1e-9)

    # the 2-process shards resumed by 1 process (no process group, unsharded model)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two, resumed / two.name)
    a = train.parse_args(["--output", str(resumed), "--resume", str(resumed / two.name)])
    assert (a.img_size, a.seed, a.batch_size, a.accum_steps) == (96, 3, 1, 2)  # the run's, from simmim_fast.pt
    assert train.main([*common, "--batch-size", "4", "--accum-steps", "1", "--output", str(resumed), "--resume"]) == 0
    assert float(_rows(resumed)[3]["loss"]) == pytest.approx(float(one[3]["loss"]), rel=1e-5)

    # the consolidated model of the 2-process shards is the one-process model (step 2: after step 3, AdamW's
    # normalised update moves elements whose gradient is ~0 by ~lr in a direction the summation order decides)
    out = tmp_path / "consolidated.pt"
    assert interchange.main(["consolidate", "--checkpoint", str(two), "--output", str(out)]) == 0
    got = ckpt.load_checkpoint(out)
    want = ckpt.load_checkpoint(single / "checkpoint_00000002.pt")["model"]
    assert set(got["model"]) == set(want) and got["step"] == 2 and "optimizer" not in got
    for k, v in want.items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    want = ckpt.load_checkpoint(single / "checkpoint_00000003.pt")["model"]
    # every reader of our checkpoints takes the run folder / the .dcp folder as it is
    ck = interchange.read_checkpoint(run)
    assert ck.kind == "pretrain" and set(ck.state_dict) == set(want) and ck.meta["step"] == 3
    assert interchange.main(["export", "--checkpoint", str(run / "checkpoint_00000003.dcp"),
                             "--output", str(tmp_path / "enc.safetensors")]) == 0
    # resuming from the consolidated file is refused with a reason (it has no optimizer state)
    other = tmp_path / "other"
    assert train.main([*common, "--batch-size", "4", "--output", str(other), "--resume", str(out)]) == 2


# ---------------------------------------------------------------------------------------------
# in one process: FSDP units against the unsharded model


@pytest.mark.parametrize("preset", ["swin_tiny_cpu", "swinv2_tiny_cpu", "vit_tiny_cpu"])
def test_sharded_per_block_matches_the_unsharded_model(group, preset):
    torch.manual_seed(0)
    ref = _tiny(preset, drop_path_rate=0.1)  # drop path: the checkpoint wrapper must replay the same RNG
    images, mask = _batch(ref)
    names = [n for n, _ in fsdp.transformer_blocks(ref)]
    assert names and all(".blocks." in n for n in names)

    # fp32 + activation checkpointing per block (inside each FSDP unit): the same numbers
    plain, shard = copy.deepcopy(ref), copy.deepcopy(ref)
    fsdp.shard_model(shard, device=CPU, precision="fp32", grad_checkpointing=True)
    assert fsdp.is_fsdp(shard) and len(fsdp.transformer_blocks(shard)) == len(names)
    assert set(shard.state_dict()) == set(ref.state_dict())  # no wrapper prefix in the names
    losses = []
    for m in (plain, shard):
        torch.manual_seed(5)
        loss = m(images, mask)
        loss.backward()
        losses.append(loss.item())
    tol = fsdp.TOLERANCES["fp32"]
    assert losses[1] == pytest.approx(losses[0], rel=tol["loss_rtol"])
    g0, g1 = _grads(plain), _grads(shard)
    assert float((g1 - g0).norm() / g0.norm()) <= tol["grad_rel"]

    # bf16 policy + autocast: as close to the fp32 gradients as autocast alone
    truth = _grads(plain)
    auto, shard = copy.deepcopy(ref), copy.deepcopy(ref)
    fsdp.shard_model(shard, device=CPU, precision="bf16")
    out = []
    for m in (auto, shard):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(images, mask)
        loss.backward()
        assert loss.dtype == torch.float32  # the loss ops stay fp32
        out.append((loss.item(), float((_grads(m) - truth).norm() / truth.norm())))
    (l_auto, e_auto), (l_fsdp, e_fsdp) = out
    tol = fsdp.TOLERANCES["bf16"]
    assert l_fsdp == pytest.approx(l_auto, rel=tol["loss_rtol"])
    assert e_fsdp <= tol["grad_vs_autocast"] * e_auto + 1e-4, (e_fsdp, e_auto)


def test_bad_precision_and_no_group_are_refused():
    model = _tiny("swin_tiny_cpu")
    with pytest.raises(ValueError, match="process group") as e:
        fsdp.shard_model(model, device=CPU, precision="fp16")
    assert "fp16" in str(e.value)  # every reason listed


def test_sharded_round_trip_into_sharded_and_unsharded_models(group, tmp_path):
    torch.manual_seed(0)
    src = _tiny("swin_tiny_cpu")
    fsdp.shard_model(src, device=CPU)
    opt = build_optimizer(src, lr=1e-3)
    images, mask = _batch(src)
    src(images, mask).backward()
    opt.step()
    path = sharded.save_sharded(tmp_path / "checkpoint_00000001.dcp", model=src, optimizer=opt,
                                meta={"step": 1, "args": {"preset": "swin_tiny_cpu"}}, info=ONE)
    assert ckpt.list_checkpoints(tmp_path) == [(1, path)] and not list(tmp_path.glob(".*tmp"))
    full = {k: fsdp.local_tensor(v).clone() for k, v in src.state_dict().items()}

    # into an unsharded model and its optimizer
    plain = _tiny("swin_tiny_cpu")
    popt = build_optimizer(plain, lr=5.0)
    popt.param_groups[0]["foreach"] = not popt.param_groups[0]["foreach"]  # how this run updates: kept
    switches = [g["foreach"] for g in popt.param_groups]
    sharded.load_sharded(path, model=plain, optimizer=popt)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, full[k]), k
    assert popt.param_groups[0]["lr"] == 1e-3 and all(int(s["step"]) == 1 for s in popt.state.values())
    assert [g["foreach"] for g in popt.param_groups] == switches
    # consolidated without a model, and through load_checkpoint
    cons = sharded.consolidated_state(path)
    assert set(cons) == set(full) and all(torch.equal(cons[k], full[k]) for k in full)
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 1 and state["sharded"] and torch.equal(state["model"]["encoder.mask_token"],
                                                                   full["encoder.mask_token"])
    assert "model" not in ckpt.load_checkpoint(path, weights=False)

    # a single-file checkpoint (full tensors, parameters by index) into a sharded model
    again = _tiny("swin_tiny_cpu")
    fsdp.shard_model(again, device=CPU)
    aopt = build_optimizer(again, lr=5.0)
    sharded.load_full_state({"model": plain.state_dict(), "optimizer": popt.state_dict()}, model=again, optimizer=aopt)
    for k, v in again.state_dict().items():
        assert torch.equal(fsdp.local_tensor(v), full[k]), k
    for p, q in zip(popt.param_groups[0]["params"], aopt.param_groups[0]["params"]):
        assert torch.equal(fsdp.local_tensor(aopt.state[q]["exp_avg"]), popt.state[p]["exp_avg"])

    wrong = _tiny("swin_tiny_cpu", embed_dim=16)
    with pytest.raises(ValueError, match="does not fit this model"):
        sharded.load_sharded(path, model=wrong, optimizer=None)

    # a save that fails (disk full) raises OSError(ENOSPC), leaves no temp folder and the earlier checkpoint
    import errno

    import torch.distributed.checkpoint as dcp

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dcp, "save", full)
        with pytest.raises(OSError) as e:
            sharded.save_sharded(tmp_path / "checkpoint_00000002.dcp", model=src, optimizer=opt, meta={"step": 2},
                                 info=ONE)
    assert e.value.errno == errno.ENOSPC and "checkpoint_00000002.dcp" in str(e.value)
    assert ckpt.list_checkpoints(tmp_path) == [(1, path)] and not list(tmp_path.glob(".*tmp"))

    # weights that became NaN on a rank stop the run before a save
    from simmim_fast.training.cli import TrainingDiverged

    with torch.no_grad():
        fsdp.local_tensor(next(src.parameters())).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="encoder.mask_token"):
        fsdp.check_sharded_state_finite(src, opt, step=2, last_good=path)


# ---------------------------------------------------------------------------------------------
# sharded checkpoints are data


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_dcp_folders_are_refused_and_never_run(group, tmp_path):
    marker = tmp_path / "MARKER"
    model = _tiny("swin_tiny_cpu")
    fsdp.shard_model(model, device=CPU)
    opt = build_optimizer(model, lr=1e-3)
    run = tmp_path / "run"
    good = sharded.save_sharded(run / "checkpoint_00000001.dcp", model=model, optimizer=opt,
                                meta={"step": 1, "args": {"preset": "swin_tiny_cpu"}}, info=ONE)

    # 1. a .metadata that would run code when unpickled (DCP itself would: pickle.load)
    evil = run / "checkpoint_00000002.dcp"
    shutil.copytree(good, evil)
    with open(evil / ".metadata", "wb") as f:
        pickle.dump(_SystemPayload(marker), f)
    for load in (lambda: ckpt.load_checkpoint(evil), lambda: sharded.load_sharded(evil, model=model, optimizer=opt),
                 lambda: ckpt.plan_resume("auto", run), lambda: interchange.read_checkpoint(run),
                 lambda: sharded.consolidated_state(evil)):
        with pytest.raises(UnsafeCheckpointError, match="posix.system"):
            load()
    assert interchange.main(["consolidate", "--checkpoint", str(evil), "--output", str(tmp_path / "x.pt")]) == 2
    assert not marker.exists()
    shutil.rmtree(evil)

    # 2. a non-tensor value that would run code (DCP reads those with torch.load(weights_only=False))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    osd["param_groups"][0]["eps"] = _SystemPayload(marker)
    bad = run / "checkpoint_00000003.dcp"
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(bad))
    shutil.copy(good / sharded.META_NAME, bad / sharded.META_NAME)
    with pytest.raises(ValueError, match="eps"):
        sharded.load_sharded(bad, model=model, optimizer=opt)
    assert not marker.exists()

    # 3. metadata naming a data file outside the folder
    md = sharded.read_dcp_metadata(good)
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    out = run / "checkpoint_00000004.dcp"
    shutil.copytree(good, out)
    with open(out / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        ckpt.load_checkpoint(out, weights=False)


# ---------------------------------------------------------------------------------------------
# the run folder's files


def _fake_dcp(path: Path, step: int, *, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"not a pickle")
    if complete:
        torch.save({"format": sharded.FORMAT, "sharded": True, "step": step, "args": {}}, path / sharded.META_NAME)
    return path


def test_listing_pruning_temps_and_branches_know_sharded_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": sharded.FORMAT, "step": 1, "args": {}, "model": {}, "optimizer": {}},
               run / "checkpoint_00000001.pt")
    _fake_dcp(run / "checkpoint_00000002.dcp", 2)
    _fake_dcp(run / "checkpoint_00000003.dcp", 3, complete=False)  # a folder without our metadata: not listed
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / f".checkpoint_00000004.dcp.{dead.pid}.tmp").mkdir()  # a killed save's folder
    (run / f".checkpoint_00000005.dcp.{os.getpid()}.tmp").mkdir()  # a live writer's: kept
    assert [(s, p.name) for s, p in ckpt.list_checkpoints(run)] == [(1, "checkpoint_00000001.pt"),
                                                                    (2, "checkpoint_00000002.dcp")]
    assert ckpt.latest_checkpoint(run).name == "checkpoint_00000002.dcp"
    removed = ckpt.clean_stale_temps(run)
    assert [p.name for p in removed] == [f".checkpoint_00000004.dcp.{dead.pid}.tmp"]
    assert (run / f".checkpoint_00000005.dcp.{os.getpid()}.tmp").is_dir()

    # a damaged newest sharded checkpoint (its DCP metadata unreadable) is stepped over, like a damaged file
    path, state, notes = ckpt.load_latest(run)
    assert path.name == "checkpoint_00000001.pt" and "checkpoint_00000002.dcp" in notes[0]

    # --resume --force from step 1 moves the later sharded folder aside
    rp = ckpt.plan_resume(str(run / "checkpoint_00000001.pt"), run, force=True)
    assert rp.moved_to is not None and (rp.moved_to / "checkpoint_00000002.dcp").is_dir()
    _fake_dcp(run / "checkpoint_00000006.dcp", 6)
    _fake_dcp(run / "checkpoint_00000007.dcp", 7)
    ckpt.prune_checkpoints(run, 1)
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["checkpoint_00000007.dcp"]


# ---------------------------------------------------------------------------------------------
# the planner and --strategy auto


def test_planner_matches_an_independent_accounting():
    model = _tiny("swin_tiny_cpu")
    est = estimate_step_memory(model, batch_size=16)  # at batch 2 the AdamW temporaries, not the batch, set the peak
    assert est.per_image > 0
    params = list(model.parameters())
    numel, count = sum(p.numel() for p in params), len(params)
    # fp32: 4 bytes per parameter; AdamW: 2 x 4 bytes per parameter + a 4-byte step per tensor; gradients as params
    assert (est.params, est.grads, est.optimizer) == (4 * numel, 4 * numel, 8 * numel + 4 * count)
    for n in (2, 4, 8):
        ddp = strategy_memory(est, model, strategy="ddp", world_size=n)
        assert (ddp.params, ddp.grads, ddp.optimizer, ddp.comm) == (4 * numel, 4 * numel, 8 * numel + 4 * count,
                                                                    4 * numel)
        assert ddp.total == est.total + 4 * numel  # the simulated peak + DDP's gradient buckets
        f = strategy_memory(est, model, strategy="fsdp", world_size=n)
        shard = 4 * sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) for p in params)  # dim-0 chunks
        assert shard == shard_bytes(params, n)
        assert (f.params, f.grads, f.optimizer) == (shard, shard, 2 * shard + 4 * count)
        pad = 4 * n * sum(p.numel() // p.shape[0] for p in params)  # < one row per tensor and rank
        assert 4 * numel / n <= f.params <= 4 * numel / n + pad
        assert f.total == f.params + f.buffers + f.grads + f.optimizer + f.activations + f.comm
        # fp32: no autocast copies to drop; the clip + AdamW temporaries shrink with the shards
        assert f.activations == max(est.fsdp_activations, math.ceil(est.update_temporaries / n))
        assert max(est.fsdp_activations, est.update_temporaries) == est.activations
        budget = f.total + 5 * f.per_image
        b = f.largest_batch(budget)
        assert f.at_batch(b) <= budget < f.at_batch(b + 1) and f.at_batch(16) == f.total
    # at batch 2 the clip + AdamW temporaries set the peak; the batch still grows the forward + backward part
    small = estimate_step_memory(model, batch_size=2)
    assert small.update_peak == small.total > small.forward_peak and small.per_image > 0
    assert small.at_batch(1) == small.total and small.at_batch(64) > small.total
    assert small.largest_batch(small.update_peak - 1) == 0
    one = strategy_memory(est, model, strategy="ddp", world_size=1)
    assert one.strategy == "single" and one.total == est.total and one.comm == 0
    bf16 = estimate_step_memory(model, batch_size=16, precision="bf16", per_image=False)
    blocks = sum(p.numel() for _, b in fsdp.transformer_blocks(model) for p in b.parameters() if p.dim() > 1)
    # what FSDP's bf16 policy saves at the activation peak (the end of the forward, at this batch): autocast's
    # bf16 copies of the blocks' matrices, 2 bytes each
    assert bf16.activations - bf16.fsdp_activations == pytest.approx(2 * blocks, rel=0.05)


def test_auto_picks_ddp_when_it_fits_else_fsdp_else_explains(capsys):
    model = _tiny("swin_tiny_cpu")
    kw = dict(device=CPU, world_size=4, batch_size=2, precision="fp32")
    est = estimate_step_memory(model, batch_size=2, per_image=False, world_size=4)
    ddp = strategy_memory(est, model, strategy="ddp", world_size=4)
    f = strategy_memory(est, model, strategy="fsdp", world_size=4)
    assert f.total < ddp.total
    free = lambda budget: int(budget / 0.9) + 1  # noqa: E731  (a step plans on 90 % of the free memory)
    assert choose_strategy("auto", model, free=free(ddp.total), **kw).strategy == "ddp"
    got = choose_strategy("auto", model, free=free((ddp.total + f.total) // 2), **kw)
    assert got.strategy == "fsdp" and "FSDP" in got.why
    assert choose_strategy("auto", model, free=None, **kw).strategy == "ddp"  # memory unknown: DDP, said why
    with pytest.raises(ValueError, match="--batch-size"):
        choose_strategy("auto", model, free=free(f.total // 3), **kw)
    with pytest.raises(ValueError, match="--batch-size"):
        choose_strategy("ddp", model, free=free((ddp.total + f.total) // 2), **kw)
    one = choose_strategy("fsdp", model, **{**kw, "world_size": 1})
    assert one.strategy == "single" and "no effect" in one.why
    with pytest.raises(ValueError, match="--precision"):
        choose_strategy("fsdp", model, free=None, **{**kw, "precision": "fp16"})


def test_cli_flags(tmp_path, cache_env, capsys):
    from simmim_fast import info
    from simmim_fast.cli import names

    assert names.STRATEGIES == STRATEGIES
    for argv in (["--strategy", "fsdp", "--precision", "fp16"], ["--strategy", "zero3"]):
        assert train.main([*argv, "--output", str(tmp_path / "r"), "--max-steps", "1"]) == 2
        assert "--strategy" in capsys.readouterr().err
    for argv in (["--plan", "bogus"], ["--plan", "swin_tiny_cpu", "--gpus", "0"],
                 ["--plan", "swin_tiny_cpu", "--gpu-memory", "-1"]):
        with pytest.raises(SystemExit) as e:
            info.main(argv)
        assert e.value.code == 2
    assert info.main(["--plan", "swin_tiny_cpu", "--img-size", "100"]) == 2  # the model refuses it
    assert "img" in capsys.readouterr().err.lower()
    assert info.main(["--plan", "swin_tiny_cpu", "--gpus", "2", "--gpu-memory", "1", "--batch-size", "2",
                      "--img-size", "96", "--grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "DDP + act. ckpt" in out and "FSDP + act. ckpt" in out and "without allocating" in out
    # --help stays torch-free
    code = ("import sys\nfrom simmim_fast import info\ntry:\n    info.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--plan PRESET" in r.stdout, r.stderr
