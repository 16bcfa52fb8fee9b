"""A PyTorch CP-ResNet / FA-ResNet as the authors built it (docs/fidelity.md, "Model"), to test the Flax port against.

NCHW layout (H = frequency), the authors' parameter names (`in_c.0`, `stage1.block1.conv1`, `feed_forward.1`),
their padding k//3 and floor max-pools. Written in PyTorch idioms on purpose, independently of the Flax code.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from emorf_jax.models import receptive_field


def frequency_map(x: torch.Tensor) -> torch.Tensor:
    """The FA channel for an NCHW map: row f of F gets 2f/F - 1."""
    batch, _, rows, frames = x.shape
    values = torch.arange(rows, dtype=x.dtype, device=x.device) * 2.0 / rows - 1.0
    return values.view(1, 1, rows, 1).expand(batch, 1, rows, frames)


class Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel1: int, kernel2: int, frequency_aware: bool):
        super().__init__()
        extra = 1 if frequency_aware else 0
        self.frequency_aware = frequency_aware
        self.conv1 = nn.Conv2d(in_channels + extra, out_channels, kernel1, padding=kernel1 // 3, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels + extra, out_channels, kernel2, padding=kernel2 // 3, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 1, bias=False), bn=nn.BatchNorm2d(out_channels))
            )

    def _with_frequency(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, frequency_map(x)], dim=1) if self.frequency_aware else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(self._with_frequency(x))))
        y = self.bn2(self.conv2(self._with_frequency(y)))
        return torch.relu(y + self.shortcut(x))


class TorchCPResNet(nn.Module):
    def __init__(self, num_classes: int, rho: int, base_channels: int, frequency_aware: bool, in_channels: int = 1):
        super().__init__()
        self.in_c = nn.Sequential(
            nn.Conv2d(in_channels, base_channels, 5, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(base_channels),
            nn.ReLU(),
        )
        kernels = dict(receptive_field.kernel_schedule(rho))
        channels = base_channels
        for stage in (1, 2, 3):
            width = base_channels * 2 ** (stage - 1)
            layers = OrderedDict()
            for block in (1, 2, 3, 4):
                name = f"stage{stage}.block{block}"
                layers[f"block{block}"] = Block(
                    channels, width, kernels[f"{name}.conv1"], kernels[f"{name}.conv2"], frequency_aware
                )
                channels = width
                if (stage, block) in receptive_field.POOLED_BLOCKS:
                    layers[f"pool{block}"] = nn.MaxPool2d(2, 2)
            setattr(self, f"stage{stage}", nn.Sequential(layers))
        self.feed_forward = nn.Sequential(nn.Conv2d(channels, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.in_c(x))))
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
