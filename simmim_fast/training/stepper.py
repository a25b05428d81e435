"""One optimizer step built from micro-batches: shared by pretraining and fine-tuning loops.

Handles gradient accumulation (DDP ``no_sync`` / FSDP2 without gradient sync on all but the last
micro-batch: ``training.fsdp.no_gradient_sync``), the per-step
learning rate, GradScaler, grad-norm clipping (``clip_grad_norm_`` with the foreach kernels: one
multi-tensor norm and one multi-tensor scale, the official total 2-norm), and keeps the loss sum and a
NaN/inf flag on the device, so that the loop touches the host only at its log and save steps. The
whole step captured in a CUDA graph is ``training.cuda_graphs.GraphedStepper``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .distributed import DistInfo
from .fsdp import no_gradient_sync


class Stepper:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        scaler: torch.amp.GradScaler,
        *,
        info: DistInfo,
        accum_steps: int = 1,
        clip_grad: float = 0.0,
    ):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.info, self.accum_steps, self.clip_grad = info, accum_steps, clip_grad
        device = info.device
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.loss_count = 0
        self.grad_norm = torch.zeros((), device=device)
        self.micro = 0
        self.params = list(model.parameters())

    def micro_step(self, step: int, compute_loss: Callable[[], torch.Tensor]) -> bool:
        """Forward + backward of one micro-batch; True when it completed optimizer step ``step``.

        ``compute_loss()`` runs the forward (under the caller's autocast) and returns the scalar loss.
        """
        last = (self.micro + 1) % self.accum_steps == 0
        if self.micro % self.accum_steps == 0:
            self.scheduler.step_update(step)
        no_sync = self.info.distributed and not last
        with no_gradient_sync(self.model, no_sync):  # DDP no_sync / FSDP2 set_requires_gradient_sync(False)
            loss = compute_loss()
            self.scaler.scale(loss / self.accum_steps).backward()
        loss_d = loss.detach()
        self.nonfinite |= ~torch.isfinite(loss_d)
        self.loss_sum += loss_d
        self.loss_count += 1
        self.micro += 1
        if not last:
            return False
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)
            if hasattr(self.grad_norm, "full_tensor"):  # FSDP: a DTensor, the norm over every rank's shards
                self.grad_norm = self.grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def diverged(self) -> bool:
        """Whether any rank saw a NaN/inf loss so far (host sync: call at log/save steps only)."""
        flag = self.nonfinite.to(torch.int32)
        if self.info.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    def pop_mean_loss(self) -> float:
        """Mean loss over all ranks since the last call, then reset (host sync: log steps only)."""
        mean = self.loss_sum / max(self.loss_count, 1)
        if self.info.distributed:
            dist.all_reduce(mean)
            mean /= self.info.world_size
        self.loss_sum.zero_()
        self.loss_count = 0
        return mean.item()
