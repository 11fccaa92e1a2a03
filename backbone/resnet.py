"""ResNet-18/34 of BasicBlocks with a CIFAR stem, optional per-task BatchNorm and Task-IL heads.

`nf` is the base width: 20 gives the reduced ResNet-18 of GPM and BMKP (1,090,140 conv
weights), 64 the standard one. The stem is a 3x3 conv without max-pool. By default the
classifier reads the last (image_size / 8)-sided map average-pooled by 2, as the GPM and BMKP
reference code: 640 features on 32x32 inputs, 2,560 on 64x64 (nf 20); smaller images keep a
2x2 map, so the head of 16x16 seq-synthetic is not squeezed to one value per channel.
`global_pool` averages the map to one value per channel instead (512 features at nf 64), as
mammoth's standard ResNet-18, the baselines' network: at nf 64 the 2x2 grid gives the heads
four times the features, and mammoth's learning rates (e.g. 0.1 for ER and CLS-ER) swing
the logits of the first steps into the tens and blow CLS-ER up.

`identity_shortcut=False` builds the BMKP reference code's variant: a block whose input and
output shapes match adds nothing to its residual branch (only blocks that change shape keep
their 1x1 projection shortcut). `head_bias=False` gives the heads no bias, as the reference's
single bias-free linear layer over all classes, of which each task reads its own rows.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork

DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class TaskBatchNorm2d(nn.Module):
    """One BatchNorm2d per task (or a single shared one), selected by the task id."""

    def __init__(self, channels: int, n_sets: int, running_stats: bool) -> None:
        super().__init__()
        self.sets = nn.ModuleList(
            nn.BatchNorm2d(channels, track_running_stats=running_stats) for _ in range(n_sets))

    def set_index(self, task: int) -> int:
        return task if len(self.sets) > 1 else 0

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.sets[self.set_index(task)](x)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, n_bn: int,
                 running_stats: bool, identity_shortcut: bool = True) -> None:
        super().__init__()
        self.identity_shortcut = identity_shortcut
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = TaskBatchNorm2d(planes, n_bn, running_stats)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = TaskBatchNorm2d(planes, n_bn, running_stats)
        self.shortcut_conv = None
        self.stride = stride
        if stride != 1 or in_planes != planes:
            # The projection shortcut subsamples, then applies a stride-1 1x1 conv: the same
            # function as a strided 1x1 conv, without the CPU kernel whose channels-last
            # backward crashes for 2-7 input channels (seen with torch 2.14 on AMD EPYC).
            self.shortcut_conv = nn.Conv2d(in_planes, planes, 1, bias=False)
            self.shortcut_bn = TaskBatchNorm2d(planes, n_bn, running_stats)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), task))
        out = self.bn2(self.conv2(out), task)
        if self.shortcut_conv is not None:
            subsampled = x[:, :, ::self.stride, ::self.stride]
            out = out + self.shortcut_bn(self.shortcut_conv(subsampled), task)
        elif self.identity_shortcut:
            out = out + x
        return F.relu(out)


class ResNet(TaskNetwork):
    """Forward takes (x, task_id) and returns the logits of that task's classes only.

    `task_id` is an int (the whole batch belongs to one task) or a tensor of per-sample task
    ids (mixed batches, e.g. replay); per-task BatchNorm needs the int form.
    """

    def __init__(self, depth: str, nf: int, n_tasks: int, classes_per_task: int,
                 per_task_bn: bool = False, bn_running_stats: bool = True,
                 in_channels: int = 3, identity_shortcut: bool = True,
                 head_bias: bool = True, image_size: int = 32, global_pool: bool = False,
                 input_mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                 ) -> None:
        super().__init__()
        # Inputs in [0, 1] are standardised here when the dataset asks for it, so every path
        # (training, evaluation, replay, projection) sees the same input; not saved with the
        # weights, since the dataset defines them.
        mean = std = None
        if input_mean_std is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                         for v in input_mean_std)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)
        self.n_tasks = n_tasks
        self.classes_per_task = classes_per_task
        self.per_task_bn = per_task_bn
        n_bn = n_tasks if per_task_bn else 1
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = TaskBatchNorm2d(nf, n_bn, bn_running_stats)
        blocks = []
        in_planes = nf
        for stage, n_blocks in enumerate(DEPTHS[depth]):
            planes = nf * 2 ** stage
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, n_bn, bn_running_stats,
                                         identity_shortcut))
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.pooled_side = 1 if global_pool else max(2, image_size // 16)
        self.feature_dim = in_planes * self.pooled_side ** 2
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, classes_per_task, bias=head_bias)
                                   for _ in range(n_tasks))

    def features(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if isinstance(task, torch.Tensor):
            if self.per_task_bn:
                raise ValueError("per-task BatchNorm needs every sample of a batch in one task")
            bn_task = 0
        else:
            bn_task = task
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        out = F.relu(self.bn1(self.conv1(x), bn_task))
        for block in self.blocks:
            out = block(out, bn_task)
        return F.adaptive_avg_pool2d(out, self.pooled_side).flatten(1)

    def task_logits(self, features: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """Each sample's logits from its own task's head (a multi-head classifier)."""
        if isinstance(task, torch.Tensor):
            all_logits = torch.stack([head(features) for head in self.heads], dim=1)
            return all_logits[torch.arange(len(features), device=features.device), task]
        return self.heads[task](features)

    def head(self, task: int) -> nn.Module:
        return self.heads[task]

    def last_feature_map(self) -> str:
        """The last residual block: its output, after the addition and ReLU, is pooled."""
        return f"blocks.{len(self.blocks) - 1}"

    def features_depend_on_task(self) -> bool:
        return self.per_task_bn

    def task_modules(self, task: int) -> dict[str, nn.Module]:
        modules = {f"{name}.sets.{m.set_index(task)}": m.sets[m.set_index(task)]
                   for name, m in self.named_modules() if isinstance(m, TaskBatchNorm2d)}
        return {**modules, f"heads.{task}": self.heads[task]}

    def own_modules(self, task: int) -> dict[str, nn.Module]:
        if self.per_task_bn:
            return self.task_modules(task)
        return {f"heads.{task}": self.heads[task]}

