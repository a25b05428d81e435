"""The SimMIM model: encoder + linear prediction head + masked regression loss.

Shapes
    images   (B, C, H, W)        normalised
    mask     (B, H/p, W/p) 0/1   at model-patch resolution, or any coarser grid dividing it
    forward  -> float32 scalar loss (the official ``SimMIM.forward``)
    predict  -> (B, C, H, W) float32 prediction in image layout

The head is the official 1x1 convolution (kept as ``decoder.0`` so official checkpoints load)
applied as a linear layer on NHWC features, giving ``(B, h, w, C*s*s)`` in PixelShuffle order;
the loss reads that layout directly (``ops.masked_l1_loss``).

Masked-only head: when the loss covers masked pixels only and the mask cells align with the
encoder's token grid, ``forward`` runs the head on the tokens holding masked pixels only
(``ops.masked_head_loss``: gather -> GEMM -> fused loss), same loss and gradients as the full head.
It is decided per call (``ops.masked_head_plan``) and can be switched off with ``model.masked_head = False``.
Under ``torch.compile`` of the whole model and in CUDA graphs the number of gathered tokens must be
static: with the official mask generator every image masks exactly ``mask_count`` cells, so
``static_head_count(batch_size, mask_generator)`` gives it on the host and ``forward(..., head_count=N)``
gathers with that static shape (``ops.masked_head.static_token_index``: no device sync). Without it the
compiled model runs the full head (same loss).

Normalised targets (``norm_target=47``, SwinV2 SimMIM's ``NORM_TARGET``): the loss regresses each
masked pixel normalised by its 47 x 47 neighbourhood (``ops.normalize_targets``); ``predict`` then
returns predictions in that normalised space and ``targets(images)`` what they are compared with.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import masked_head_loss, masked_head_plan, masked_l1_loss, normalize_targets, pixel_shuffle_head
from ..ops.masked_head import check_token_index, static_head_count, static_token_index, token_mask
from ..ops.masked_l1_loss import LOSSES, REGIONS
from ..ops.norm_target import check_norm_target


class SimMIM(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        *,
        encoder_stride: int,
        in_chans: int = 3,
        loss: str = "l1",
        predict: str = "masked",
        ops_backend: str = "auto",
        masked_head: bool = True,
        norm_target: int | None = None,
        check_head_tokens: bool | None = None,
    ):
        """``norm_target``: None (regress pixels, official SimMIM) or the patch size of SwinV2 SimMIM's
        normalised targets (official 47). ``check_head_tokens``: how ``forward`` checks the values of a
        ``head_tokens`` index (``ops.check_token_index``'s ``content``: None = CPU indices only)."""
        super().__init__()
        check_norm_target(norm_target)
        if check_head_tokens is not None and not isinstance(check_head_tokens, bool):
            raise TypeError(f"check_head_tokens: expected None, True or False, got {check_head_tokens!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        if predict not in REGIONS:
            raise ValueError(f"predict: expected one of {REGIONS}, got {predict!r}")
        self.encoder = encoder
        self.encoder_stride = encoder_stride
        self.in_chans = in_chans
        self.patch_size = encoder.patch_size
        self.loss_type = loss
        self.predict_region = predict
        self.ops_backend = ops_backend
        self.masked_head = masked_head
        self.norm_target = norm_target
        self.check_head_tokens = check_head_tokens
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, encoder_stride**2 * in_chans, kernel_size=1),
            nn.PixelShuffle(encoder_stride),
        )

    @property
    def img_size(self) -> tuple[int, int]:
        g = self.encoder.grid_size
        return g[0] * self.patch_size, g[1] * self.patch_size

    def _check(self, images: torch.Tensor, mask: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != self.in_chans:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, {self.in_chans}, H, W), got {shape}")
        if tuple(images.shape[2:]) != self.img_size:
            raise ValueError(f"images: expected spatial size {self.img_size} for this model, got {tuple(images.shape[2:])}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor (normalised), got {images.dtype}")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 3 or mask.shape[0] != images.shape[0]:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask: expected (B, h, w) with B={images.shape[0]}, got {shape}")
        if mask.dtype != torch.bool and not torch.compiler.is_compiling():
            # 0/1 only (a bool mask needs no check; others cost one device sync on CUDA)
            if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("mask: expected 0/1 values (1 = masked) or a bool tensor, got other values")
        gh, gw = self.encoder.grid_size
        if gh % mask.shape[1] or gw % mask.shape[2]:
            raise ValueError(
                f"mask: grid {tuple(mask.shape[1:])} must divide the model-patch grid {(gh, gw)} "
                f"(patch size {self.patch_size})"
            )

    def _head_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        conv = self.decoder[0]
        return conv.weight.view(conv.weight.shape[0], -1), conv.bias  # (C*s*s, F), (C*s*s,)

    def _head(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.encoder(images, mask)  # (B, h, w, F)
        return F.linear(z, *self._head_params())  # (B, h, w, C*s*s)

    def masked_head_tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Token index for the masked-only head, or None when the full head runs (see the module doc)."""
        if not self.masked_head or torch.compiler.is_compiling():
            return None
        h, w = self.img_size[0] // self.encoder_stride, self.img_size[1] // self.encoder_stride
        index, _ = masked_head_plan(mask, (h, w), tuple(images.shape[2:]), region=self.predict_region)
        return index

    def static_head_count(self, batch_size: int, mask_generator) -> tuple[int | None, str]:
        """``(N, "")``: the masked-only head's token count for batches of ``batch_size`` masks drawn by
        ``mask_generator`` (a :class:`~simmim_fast.MaskGenerator`: exactly ``mask_count`` cells per image),
        to pass as ``forward(..., head_count=N)``; ``(None, reason)`` when it is not static (the head then
        needs ``head_tokens`` or the full head)."""
        if not self.masked_head:
            return None, "the model's masked_head is off"
        for attr in ("input_size", "mask_patch_size", "mask_count"):
            if not hasattr(mask_generator, attr):
                raise TypeError(f"mask_generator: expected a simmim_fast.MaskGenerator, got "
                                f"{type(mask_generator).__name__}")
        size = mask_generator.input_size
        if (size, size) != self.img_size:
            raise ValueError(f"mask_generator: input_size {size} differs from the model's image size {self.img_size}")
        cells = size // mask_generator.mask_patch_size
        grid = (self.img_size[0] // self.encoder_stride, self.img_size[1] // self.encoder_stride)
        return static_head_count(batch_size=batch_size, grid=grid, mask_grid=(cells, cells),
                                 masked_cells=int(mask_generator.mask_count), region=self.predict_region)

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        *,
        head_tokens: torch.Tensor | None = None,
        head_count: int | None = None,
    ) -> torch.Tensor:
        """Loss (float32 scalar) of the official ``SimMIM.forward(x, mask)``.

        ``head_tokens``: the masked-only head's token index, ``masked_head_tokens(images, mask)``
        computed by the caller where it is free, e.g. on the loader's CPU copy of the mask; without
        it the model decides itself, which synchronises with the device on CUDA (the gathered token
        count is data-dependent). The training loop passes it on CUDA. It must be exactly the tokens
        holding masked pixels (``ops.check_token_index``): dtype, shape, device and count are always
        checked (ValueError), its values when it is on the CPU (or always with
        ``check_head_tokens=True``, which synchronises on CUDA; never with False).

        ``head_count``: the static number of tokens holding masked pixels in this batch
        (``static_head_count``); the head gathers them with a static shape and no device sync, which is
        what ``torch.compile`` of the whole model and CUDA graphs need. On a CPU mask outside
        ``torch.compile`` the count is checked (ValueError); elsewhere a batch with more such tokens than
        ``head_count`` gives a NaN loss (never a silently partial one) and fewer is exact. Ignored when
        ``masked_head`` is off; not together with ``head_tokens``.
        """
        self._check(images, mask)
        if head_count is not None and head_tokens is not None:
            raise ValueError("head_count: give head_tokens or head_count, not both")
        if head_count is not None and self.masked_head:
            return self._static_head_loss(images, mask, head_count)
        if head_tokens is not None:
            if (not isinstance(head_tokens, torch.Tensor) or head_tokens.dim() != 1
                    or head_tokens.dtype != torch.int64 or head_tokens.device != images.device):
                got = (f"{tuple(head_tokens.shape)} {head_tokens.dtype} on {head_tokens.device}"
                       if isinstance(head_tokens, torch.Tensor) else type(head_tokens).__name__)
                raise ValueError(
                    f"head_tokens: expected a 1-D int64 index on {images.device} (from masked_head_tokens), got {got}"
                )
            if self.predict_region != "masked":
                raise ValueError(f"head_tokens: the masked-only head needs predict='masked', this model predicts "
                                 f"{self.predict_region!r} (every token)")
            h, w = self.img_size[0] // self.encoder_stride, self.img_size[1] // self.encoder_stride
            check_token_index(head_tokens, mask, (h, w), tuple(images.shape[2:]), device=images.device,
                              name="head_tokens", content=self.check_head_tokens)
            index = head_tokens
        else:
            index = self.masked_head_tokens(images, mask)  # decided before the encoder runs
        z = self.encoder(images, mask)  # (B, h, w, F)
        weight, bias = self._head_params()
        if index is not None:
            return masked_head_loss(
                z, weight, bias, images, mask, token_index=index, loss=self.loss_type, norm_target=self.norm_target,
                check_index=False, backend=self.ops_backend,  # checked above (or the model's own plan)
            )
        pred = F.linear(z, weight, bias)  # (B, h, w, C*s*s)
        return masked_l1_loss(
            pred, images, mask, loss=self.loss_type, region=self.predict_region, norm_target=self.norm_target,
            backend=self.ops_backend,
        )

    def check_head_count(self, mask: torch.Tensor, head_count: int) -> None:
        """ValueError unless exactly ``head_count`` head tokens of ``mask`` hold masked pixels (on a CUDA
        mask this synchronises: call it on the loader's CPU copy)."""
        h, w = self.img_size[0] // self.encoder_stride, self.img_size[1] // self.encoder_stride
        found = int(token_mask(mask, (h, w), self.img_size).sum())
        if found != head_count:
            raise ValueError(f"head_count: {head_count}, but {found} tokens of this batch hold masked pixels "
                             f"(static_head_count needs exactly the generator's mask_count cells per image)")

    def _static_head_loss(self, images: torch.Tensor, mask: torch.Tensor, head_count: int) -> torch.Tensor:
        if isinstance(head_count, bool) or not isinstance(head_count, int) or head_count <= 0:
            raise ValueError(f"head_count: expected a positive int (from static_head_count), got {head_count!r}")
        if self.predict_region != "masked":
            raise ValueError(f"head_count: the masked-only head needs predict='masked', this model predicts "
                             f"{self.predict_region!r} (every token)")
        h, w = self.img_size[0] // self.encoder_stride, self.img_size[1] // self.encoder_stride
        size = tuple(images.shape[2:])
        if mask.device.type == "cpu" and not torch.compiler.is_compiling():
            self.check_head_count(mask, head_count)
        index, overflow = static_token_index(mask, (h, w), size, head_count)
        z = self.encoder(images, mask)  # (B, h, w, F)
        weight, bias = self._head_params()
        loss = masked_head_loss(
            z, weight, bias, images, mask, token_index=index, loss=self.loss_type, norm_target=self.norm_target,
            check_index=False, backend=self.ops_backend,
        )
        return torch.where(overflow, torch.full_like(loss, float("nan")), loss)  # left-out tokens: NaN, not a number

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prediction in image layout ``(B, C, H, W)``, float32 (what the loss compares)."""
        self._check(images, mask)
        pred = self._head(images, mask)
        return pixel_shuffle_head(pred, in_chans=self.in_chans, backend=self.ops_backend).float()

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float32: what ``predict``'s output is compared with (the images, or their
        normalised targets with ``norm_target``)."""
        if self.norm_target is None:
            return images.float()
        return normalize_targets(images, patch_size=self.norm_target, backend=self.ops_backend)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        if hasattr(self.encoder, "no_weight_decay"):
            return {"encoder." + n for n in self.encoder.no_weight_decay()}
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
