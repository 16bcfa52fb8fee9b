"""CP-ResNet, FA-ResNet and Shake-Shake FA-ResNet in PyTorch, for inference: what an exported state_dict
(`torch_export`) loads into. Needs torch (the `[export]` extra).

The parameter names are the authors' (`in_c.0`, `stage1.block1.conv1`, `feed_forward.1`; Shake-Shake's branches
`stage1.block1.branch1.conv1`, as `torch_import` names them) and the layout theirs: NCHW with H = frequency, row 0
the lowest mel bin. The kernel schedule, pools and stem come from `cp_resnet`, so this module follows the Flax one;
the tests check both against a PyTorch reference written out independently (`tests/torch_reference.py`).

Evaluation as ours: Shake-Shake mixes its branches with α = 0.5, and a model trained with `features_shift` rolls
each block's conv1 input by the fixed shifts that the evaluation draws (`shifts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from emorf_jax.models.cp_resnet import (
    POOLED_BLOCKS,
    STEM_KERNEL,
    STEM_PADDING,
    STEM_STRIDE,
    block_conv_padding,
    block_names,
    kernel_schedule,
)


def _with_frequency_channel(x: torch.Tensor) -> torch.Tensor:
    """x with the FA channel appended: 2f/F - 1 at frequency row f of F, constant in time."""
    rows = x.shape[2]
    channel = torch.arange(rows, dtype=x.dtype, device=x.device) * (2.0 / rows) - 1.0
    return torch.cat([x, channel.view(1, 1, rows, 1).expand(x.shape[0], 1, rows, x.shape[3])], dim=1)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A bias-free conv with the authors' padding (`block_conv_padding`)."""
    return nn.Conv2d(in_channels, out_channels, kernel, padding=block_conv_padding(kernel), bias=False)


class Branch(nn.Module):
    """conv1-BN-ReLU-conv2-BN, each conv with the FA channel appended to its input when frequency-aware, conv1's
    input (FA channel included) rolled by `shift` frequency rows when one is given."""

    def __init__(self, in_channels: int, out_channels: int, kernels: tuple[int, int], frequency_aware: bool):
        super().__init__()
        extra = int(frequency_aware)
        self.frequency_aware = frequency_aware
        self.conv1 = _conv(in_channels + extra, out_channels, kernels[0])
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv(out_channels + extra, out_channels, kernels[1])
        self.bn2 = nn.BatchNorm2d(out_channels)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return _with_frequency_channel(x) if self.frequency_aware else x

    def forward(self, x: torch.Tensor, shift: int | None) -> torch.Tensor:
        y = self._input(x)
        if shift is not None:
            y = torch.roll(y, shift, dims=2)
        y = torch.relu(self.bn1(self.conv1(y)))
        return self.bn2(self.conv2(self._input(y)))


class Shortcut(nn.Module):
    """The 1x1 conv and BatchNorm (`shortcut.conv`, `shortcut.bn`) of a block that changes the width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _shortcut(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Identity() if in_channels == out_channels else Shortcut(in_channels, out_channels)


class Block(Branch):
    """The authors' basic block: ReLU(shortcut(x) + branch(x)), its branch's layers under the block's own names."""

    def __init__(
        self, in_channels: int, out_channels: int, kernels: tuple[int, int], frequency_aware: bool, shift: int | None
    ):
        super().__init__(in_channels, out_channels, kernels, frequency_aware)
        self.shortcut = _shortcut(in_channels, out_channels)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.shortcut(x) + super().forward(x, self.shift))


class ShakeShakeBlock(nn.Module):
    """ReLU(shortcut(x) + (branch1(x) + branch2(x)) / 2): Shake-Shake at evaluation, α = 0.5."""

    def __init__(
        self, in_channels: int, out_channels: int, kernels: tuple[int, int], frequency_aware: bool, shift: int | None
    ):
        super().__init__()
        self.branch1 = Branch(in_channels, out_channels, kernels, frequency_aware)
        self.branch2 = Branch(in_channels, out_channels, kernels, frequency_aware)
        self.shortcut = _shortcut(in_channels, out_channels)
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = 0.5 * self.branch1(x, self.shift) + 0.5 * self.branch2(x, self.shift)
        return torch.relu(self.shortcut(x) + mixed)


class TorchCPResNet(nn.Module):
    """`model(x)` -> logits (batch, tags) of NCHW spectrograms (batch, in_channels, n_mels, frames), normalised as
    for the Flax model; BatchNorm in inference mode after `model.eval()`.

    `shifts`: one frequency roll per block in network order (a `features_shift` model's evaluation draws); None for
    no roll.
    """

    def __init__(
        self,
        num_classes: int,
        rho: int,
        base_channels: int,
        frequency_aware: bool,
        shake_shake: bool = False,
        in_channels: int = 1,
        shifts: Sequence[int] | None = None,
    ):
        super().__init__()
        self.in_c = nn.Sequential(
            nn.Conv2d(in_channels, base_channels, STEM_KERNEL, stride=STEM_STRIDE, padding=STEM_PADDING, bias=False),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(),
        )
        kernels = dict(kernel_schedule(rho))
        block_type = ShakeShakeBlock if shake_shake else Block
        names = block_names()
        if shifts is not None and len(shifts) != len(names):
            raise ValueError(f"{len(shifts)} shifts for {len(names)} blocks")
        self.blocks: list[tuple[nn.Module, bool]] = []  # (block, followed by a 2x2 max-pool), in network order
        channels = base_channels
        for index, (stage, block) in enumerate(names):
            if block == 1:
                self.add_module(f"stage{stage}", nn.ModuleDict())
            prefix = f"stage{stage}.block{block}"
            width = base_channels * 2 ** (stage - 1)
            module = block_type(
                channels,
                width,
                (kernels[f"{prefix}.conv1"], kernels[f"{prefix}.conv2"]),
                frequency_aware,
                None if shifts is None else int(shifts[index]),
            )
            getattr(self, f"stage{stage}")[f"block{block}"] = module
            self.blocks.append((module, (stage, block) in POOLED_BLOCKS))
            channels = width
        self.feed_forward = nn.Sequential(nn.Conv2d(channels, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding): the embedding is the last block's output averaged over frequency and time, what the
        1x1 head reads, as the Flax model sows it."""
        x = self.in_c(x)
        for block, pooled in self.blocks:
            x = block(x)
            if pooled:
                x = nn.functional.max_pool2d(x, 2)
        return self.feed_forward(x).mean(dim=(2, 3)), x.mean(dim=(2, 3))
