"""The whole pretraining step (forward, backward, grad-norm clip, AdamW) captured once in a CUDA graph.

After ``warmup_steps`` ordinary steps on a side stream (PyTorch's rule for capture: allocations,
compilation, autotuning and the optimizer's state happen there), one step is captured with
``torch.cuda.graph`` and every later step is a replay: the loader's batch is copied into static
input buffers (:class:`StaticBatch`: an async host-to-device copy from the torch loader's pinned
memory, a device-to-device copy of DALI's GPU batch), the learning rate is written into a device
tensor (:class:`DeviceLr`, so the schedule needs no re-capture), then ``graph.replay()``. The loss sum,
the NaN/inf flag and the grad norm stay on the device as in :class:`~simmim_fast.training.stepper.
Stepper`; the loop reads them at log steps only.

What the capture needs, and where it cannot hold (:func:`cuda_graph_reasons`, logged once):

- a CUDA device;
- no host sync inside the step: bf16 or fp32 (fp16's GradScaler reads its inf flag on the host),
  AdamW with ``capturable=True`` and a tensor ``lr`` (:func:`make_capturable`), the clip without
  ``error_if_nonfinite``, the mask as a bool tensor (no value check), and the masked-only head with a
  static token count (``SimMIM.static_head_count``; without one the graph holds the full head);
- one micro-batch per optimizer step (no ``--accum-steps``), no DDP (its bucketed all-reduce hooks
  are not captured here), no activation checkpointing (its RNG-state save/restore inside backward).

:class:`GraphedStepper` with ``capture=False`` runs exactly the body that is captured, eagerly, every
step: that is how the CPU tests check the static-buffer plumbing and the tensor learning rate. The
capture itself needs a GPU.
"""
from __future__ import annotations

import logging

import torch

from .distributed import DistInfo
from .stepper import Stepper

log = logging.getLogger("simmim_fast.cuda_graphs")

CUDA_GRAPH_MODES = ("auto", "on", "off")


def cuda_graph_reasons(
    *,
    device: torch.device | str,
    precision: str,
    distributed: bool,
    accum_steps: int,
    grad_checkpointing: bool = False,
) -> list[str]:
    """Every reason the whole-step capture cannot hold for this run (empty: it can)."""
    device = torch.device(device)
    reasons = []
    if device.type != "cuda":
        reasons.append(f"device is {device.type}: CUDA graphs need a CUDA device")
    if precision == "fp16":
        reasons.append("precision fp16: its GradScaler checks for inf gradients on the host every step (use bf16)")
    if distributed:
        reasons.append("several processes (DDP or FSDP): their gradient collectives are not captured here")
    if accum_steps != 1:
        reasons.append(f"--accum-steps {accum_steps}: one captured step is one micro-batch per optimizer step")
    if grad_checkpointing:
        reasons.append("activation checkpointing: it saves and restores the RNG state inside backward")
    return reasons


# the capture and replay have never run on a GPU: until they have, ``auto`` keeps them off
AUTO_OFF_REASON = ("--cuda-graphs auto is off until the whole-step capture has been verified on a GPU "
                   "(--cuda-graphs on turns it on)")


def resolve_cuda_graphs(mode: str, reasons: list[str]) -> tuple[bool, list[str]]:
    """``(use, why_not)`` for ``--cuda-graphs mode`` given :func:`cuda_graph_reasons`' ``reasons``.

    ``off``: never (no reasons listed). ``on``: where no reason stands against it, else off with them.
    ``auto``: off for now; the standing reasons when there are any, else ``AUTO_OFF_REASON``.
    """
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graphs: expected one of {CUDA_GRAPH_MODES}, got {mode!r}")
    if mode == "off":
        return False, []
    if reasons:
        return False, list(reasons)
    if mode == "auto":
        return False, [AUTO_OFF_REASON]
    return True, []


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Make ``optimizer`` (AdamW, before its first step) capturable with one device tensor as every group's
    ``lr``; returns that tensor. Its state (``step`` included) then lives on the parameters' device."""
    if optimizer.state:
        raise ValueError("optimizer: make it capturable before its first step (its state already exists)")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("optimizer: no parameters")
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    if len(lrs) != 1:
        raise ValueError(f"optimizer: its groups have different learning rates {sorted(lrs)}; one shared "
                         f"device lr is supported")
    lr = torch.tensor(lrs.pop(), dtype=torch.float32, device=params[0].device)
    for g in optimizer.param_groups:
        if "capturable" not in g:
            raise TypeError(f"optimizer: {type(optimizer).__name__} has no 'capturable' option")
        g["capturable"] = True
        g["lr"] = lr
    return lr


class DeviceLr:
    """A schedule whose value goes into the optimizer's device ``lr`` tensor (no re-capture needed).

    ``step_update(t)`` writes ``scheduler.lr_for_step(t)`` (the same float the scheduler's own
    ``step_update`` sets) with one ``fill_`` (an async device write) and returns it; ``state_dict`` /
    ``load_state_dict`` are the scheduler's, so checkpoints are the same.
    """

    def __init__(self, scheduler, lr: torch.Tensor):
        if not isinstance(lr, torch.Tensor) or lr.numel() != 1:
            raise TypeError("lr: expected the one-element device tensor of make_capturable")
        self.scheduler, self.lr = scheduler, lr
        self.last = float("nan")

    def step_update(self, t: int) -> float:
        value = self.scheduler.lr_for_step(t)
        self.lr.fill_(value)
        self.last = value
        return value

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class StaticBatch:
    """Static device buffers for one batch: ``images (B, C, H, W)`` float and ``masks (B, h, w)``.

    ``fill(images, masks)`` copies a batch of exactly these shapes and dtypes in (``non_blocking``:
    from pinned host memory or from the device); anything else is a ValueError, never a silent
    reshape (a graph replays fixed addresses and shapes).
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, *, device: torch.device | str):
        device = torch.device(device)
        self.images = torch.empty(images.shape, dtype=images.dtype, device=device)
        self.masks = torch.empty(masks.shape, dtype=masks.dtype, device=device)

    def fill(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        problems = []
        for name, got, want in (("images", images, self.images), ("masks", masks, self.masks)):
            if not isinstance(got, torch.Tensor):
                problems.append(f"{name}: expected a tensor, got {type(got).__name__}")
            elif got.shape != want.shape or got.dtype != want.dtype:
                problems.append(f"{name}: expected {tuple(want.shape)} {want.dtype} (the captured batch), "
                                f"got {tuple(got.shape)} {got.dtype}")
        if problems:
            raise ValueError("; ".join(problems))
        self.images.copy_(images, non_blocking=True)
        self.masks.copy_(masks, non_blocking=True)


class GraphedStepper(Stepper):
    """One optimizer step per batch, captured in a CUDA graph after ``warmup_steps`` (module doc).

    ``model`` is the (possibly compiled) SimMIM model, ``optimizer`` made capturable
    (:func:`make_capturable`), ``scheduler`` a :class:`DeviceLr`. ``head_count``: the static
    masked-only head count (None: full head). ``amp_dtype``: the autocast dtype (None: fp32).
    ``capture=False`` runs the capture body eagerly each step (CPU tests).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: DeviceLr,
        *,
        info: DistInfo,
        clip_grad: float = 0.0,
        head_count: int | None = None,
        amp_dtype: torch.dtype | None = None,
        warmup_steps: int = 3,
        capture: bool = True,
    ):
        super().__init__(model, optimizer, scheduler, torch.amp.GradScaler(info.device.type, enabled=False), info=info,
                         accum_steps=1, clip_grad=clip_grad)
        if not isinstance(scheduler, DeviceLr):
            raise TypeError("scheduler: expected a DeviceLr (the learning rate as a device tensor)")
        if capture and info.device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need a CUDA device, this run is on {info.device}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected an int >= 1, got {warmup_steps!r}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.kwargs = {} if head_count is None else {"head_count": head_count}
        self.amp_dtype, self.warmup_steps, self.capture = amp_dtype, warmup_steps, capture
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=info.device)
        self.batch: StaticBatch | None = None
        self.side = torch.cuda.Stream(info.device) if info.device.type == "cuda" else None  # warm-up stream
        self.graph = None
        self.warmed = 0
        self.status = "warming up" if capture else "eager (capture=False)"

    # the captured body: no host sync, every output written in place into a static tensor
    def _body(self) -> None:
        with torch.autocast(self.info.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            loss = self.model(self.batch.images, self.batch.masks != 0, **self.kwargs)
        loss.backward()
        if self.clip_grad > 0:
            self.grad_norm.copy_(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True))
        self.optimizer.step()
        loss_d = loss.detach()
        self.nonfinite |= ~torch.isfinite(loss_d)
        self.loss_sum += loss_d

    def _eager(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.info.device.type != "cuda":
            self._body()
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self._body()
        torch.cuda.current_stream().wait_stream(self.side)

    def _capture(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the graph's own pool allocates the gradients
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread (or DALI's) may call CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body()
        self.graph = graph

    def train_step(self, step: int, images: torch.Tensor, masks: torch.Tensor) -> bool:
        """Optimizer step ``step`` on this batch (copied into the static buffers); always True."""
        self.scheduler.step_update(step)
        if self.batch is None:
            self.batch = StaticBatch(images, masks, device=self.info.device)
        self.batch.fill(images, masks)
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.warmed >= self.warmup_steps:
            try:
                self._capture()
            except Exception as exc:  # never observed (no GPU here): keep training without the graph
                log.warning("CUDA graphs: off: the capture failed (%s: %s); continuing without", type(exc).__name__,
                            " ".join(str(exc).split())[:300])
                self.capture, self.status = False, f"off: capture failed ({type(exc).__name__})"
                self._eager()
            else:
                self.status = f"captured at step {step + 1}"
                self.graph.replay()
        else:
            self._eager()
            self.warmed += 1
        self.loss_count += 1
        self.micro += 1
        return True

    def micro_step(self, step, compute_loss):  # noqa: D401 - the loop calls train_step on this stepper
        raise TypeError("GraphedStepper: call train_step(step, images, masks) (the step reads static buffers)")
