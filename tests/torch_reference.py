"""A PyTorch CP-ResNet / FA-ResNet as the authors built it (docs/fidelity.md, "Model"), to test the Flax port and the
package's PyTorch definition (`emorf_jax/models/torch_cp_resnet.py`, which exported state_dicts load into) against;
Shake-Shake FA-ResNet at evaluation, with the branch names our export writes (the authors published none).

NCHW layout (H = frequency), the authors' parameter names (`in_c.0`, `stage1.block1.conv1`, `feed_forward.1`),
their padding k//3, floor max-pools, kernel schedule and optional frequency roll. Written in PyTorch idioms on
purpose, independently of the Flax code: nothing here comes from emorf_jax.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

# Blocks of each stage (counted from 1) followed by a 2x2 max-pool: the "maxpool" lists of the authors' config.
MAXPOOL_AFTER = {"stage1": (1, 2, 4), "stage2": (), "stage3": ()}


def authors_kernels(rho: int) -> dict[str, tuple[list[int], list[int]]]:
    """Per stage, the kernel sizes of conv1 ("k1s") and conv2 ("k2s") of its four blocks, as the authors'
    `get_model_based_on_rho` (their `models/cp_resnet.py` and `models/cp_faresnet.py`) sets them for any integer ρ.

    Their thresholds on e = ρ - 7, written out: `shrunk(t)` is 3 unless -e > t, `grown(t)` is 1 unless e > t.
    """
    e = rho - 7

    def shrunk(threshold: int) -> int:
        return 1 if -e > threshold else 3

    def grown(threshold: int) -> int:
        return 3 if e > threshold else 1

    return {
        "stage1": ([3, shrunk(6), shrunk(4), shrunk(2)], [1, shrunk(5), shrunk(3), shrunk(1)]),
        "stage2": ([shrunk(0), grown(1), grown(3), grown(5)], [grown(0), grown(2), grown(4), grown(6)]),
        "stage3": ([grown(7), grown(9), grown(11), grown(13)], [grown(8), grown(10), grown(12), grown(14)]),
    }


def frequency_map(x: torch.Tensor) -> torch.Tensor:
    """The FA channel for an NCHW map: row f of F gets 2f/F - 1."""
    batch, _, rows, frames = x.shape
    values = torch.arange(rows, dtype=x.dtype, device=x.device) * 2.0 / rows - 1.0
    return values.view(1, 1, rows, 1).expand(batch, 1, rows, frames)


class Block(nn.Module):
    """The authors' basic block; with `shake_shake`, two such branches (`branch1`, `branch2`, each conv1-bn1-conv2-bn2)
    whose outputs are averaged, Shake-Shake's evaluation mix (α = 0.5), before the shortcut is added."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel1: int,
        kernel2: int,
        frequency_aware: bool,
        shake_shake: bool = False,
    ):
        super().__init__()
        extra = 1 if frequency_aware else 0
        self.frequency_aware = frequency_aware
        if shake_shake:
            self.branch1, self.branch2 = nn.Module(), nn.Module()
            self.branches = [self.branch1, self.branch2]
        else:
            self.branches = [self]
        for owner in self.branches:
            owner.conv1 = nn.Conv2d(in_channels + extra, out_channels, kernel1, padding=kernel1 // 3, bias=False)
            owner.bn1 = nn.BatchNorm2d(out_channels)
            owner.conv2 = nn.Conv2d(out_channels + extra, out_channels, kernel2, padding=kernel2 // 3, bias=False)
            owner.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 1, bias=False), bn=nn.BatchNorm2d(out_channels))
            )

    def _with_frequency(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, frequency_map(x)], dim=1) if self.frequency_aware else x

    def forward(self, x: torch.Tensor, shift: int | None = None) -> torch.Tensor:
        """`shift`: the authors' `features_shift` roll of conv1's input, FA channel included, by that many rows
        along frequency (conv2's input and the shortcut are not rolled)."""
        outputs = []
        for owner in self.branches:
            y = self._with_frequency(x)
            if shift is not None:
                y = y.roll(shift, 2)
            y = torch.relu(owner.bn1(owner.conv1(y)))
            outputs.append(owner.bn2(owner.conv2(self._with_frequency(y))))
        return torch.relu(torch.stack(outputs).mean(dim=0) + self.shortcut(x))


class TorchCPResNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        rho: int,
        base_channels: int,
        frequency_aware: bool,
        in_channels: int = 1,
        shake_shake: bool = False,
    ):
        super().__init__()
        self.in_c = nn.Sequential(
            nn.Conv2d(in_channels, base_channels, 5, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(),
        )
        channels = base_channels
        for index, (stage, (k1s, k2s)) in enumerate(authors_kernels(rho).items()):
            width = base_channels * 2**index
            layers = OrderedDict()
            for block, (kernel1, kernel2) in enumerate(zip(k1s, k2s), start=1):
                layers[f"block{block}"] = Block(channels, width, kernel1, kernel2, frequency_aware, shake_shake)
                channels = width
                if block in MAXPOOL_AFTER[stage]:
                    layers[f"pool{block}"] = nn.MaxPool2d(2, 2)
            setattr(self, stage, nn.Sequential(layers))
        self.feed_forward = nn.Sequential(nn.Conv2d(channels, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes))

    def blocks(self) -> list[Block]:
        """The 12 blocks in network order."""
        return [layer for stage in MAXPOOL_AFTER for layer in getattr(self, stage) if isinstance(layer, Block)]

    def forward(self, x: torch.Tensor, shifts: Sequence[int] | None = None) -> torch.Tensor:
        """`shifts`: one frequency roll per block in network order, the draws of the authors' `features_shift`
        (their FA-ResNet draws each, per block and call, uniformly from -50..50); None: no roll."""
        blocks = self.blocks()
        if shifts is not None and len(shifts) != len(blocks):
            raise ValueError(f"{len(shifts)} shifts for {len(blocks)} blocks")
        rolls = dict(zip(blocks, shifts)) if shifts is not None else {}
        x = self.in_c(x)
        for stage in MAXPOOL_AFTER:
            for layer in getattr(self, stage):
                x = layer(x, rolls.get(layer)) if isinstance(layer, Block) else layer(x)
        return self.feed_forward(x).mean(dim=(2, 3))


def randomise(model: nn.Module, seed: int) -> None:
    """Random weights AND running statistics everywhere, so that no comparison passes trivially through zeros."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(tensor.shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * fan_in**-0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                module.bias.copy_(uniform(module.bias, -0.5, 0.5))
                module.running_mean.copy_(uniform(module.running_mean, -0.5, 0.5))
                module.running_var.copy_(uniform(module.running_var, 0.5, 2.0))


def state_dict_as_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}
