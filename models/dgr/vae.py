"""DGR's generator: a task-conditional convolutional VAE.

The architecture is the one the BMKP authors carry in their fork (SunWenJu123/BMKP,
backbone/VAE.py, itself AntixK/PyTorch-VAE's VanillaVAE): stride-2 3x3 convolutions with
BatchNorm and LeakyReLU halve the image down to 2 x 2; linear layers give the latent mean and
log-variance; the decoder mirrors the encoder with stride-2 transposed convolutions, and a
last transposed convolution plus a 3x3 convolution and a sigmoid give images in [0, 1], the
range the solver's inputs are in. Stage widths double from `width`: the fork's
[32, 64, 128, 256, 512] on 64 x 64 images (the only size its linear layers fit); on 32 x 32
images the last stage goes, [32, 64, 128, 256]. The loss is the fork's:
the pixel mean of the squared error plus kld_weight times the KL divergence to N(0, I)
summed over the latent dimensions, here per sample (so replayed and real samples can be
weighted apart).

Added: the task conditions both halves: its one-hot vector is appended to the encoder's
flattened features before the mean and log-variance layers, and to the latent code before
the decoder, so `sample(tasks)` draws images of the tasks asked for (models/dgr/model.py says
why). AntixK's ConditionalVAE conditions on a class alike at the decoder; at the encoder it
adds the label as an extra image channel instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError


def _down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU())


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1,
                                            output_padding=1),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU())


def stage_widths(image_size: int, width: int) -> list[int]:
    """The encoder's channel widths, one stage per halving from image_size down to 2."""
    stages = int(math.log2(image_size)) - 1
    if stages < 1 or 2 ** (stages + 1) != image_size:
        raise UserError(f"dgr's VAE needs square images whose side is a power of two of at "
                        f"least 4, not {image_size}; pick another dataset")
    return [width * 2 ** i for i in range(stages)]


class ConvVAE(nn.Module):
    def __init__(self, image_size: int, channels: int, n_tasks: int, width: int,
                 latent_dim: int) -> None:
        super().__init__()
        widths = stage_widths(image_size, width)
        self.n_tasks = n_tasks
        self.latent_dim = latent_dim
        self.top = widths[-1]
        flat = self.top * 4  # the last stage's 2 x 2 map
        self.encoder = nn.Sequential(*(_down(a, b) for a, b in zip([channels, *widths], widths)))
        self.fc_mu = nn.Linear(flat + n_tasks, latent_dim)
        self.fc_log_var = nn.Linear(flat + n_tasks, latent_dim)
        self.decoder_input = nn.Linear(latent_dim + n_tasks, flat)
        rising = widths[::-1]
        self.decoder = nn.Sequential(*(_up(a, b) for a, b in zip(rising, rising[1:])))
        self.final = nn.Sequential(_up(widths[0], widths[0]),
                                   nn.Conv2d(widths[0], channels, 3, padding=1), nn.Sigmoid())

    def _condition(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """`x` with each sample's task appended as a one-hot vector."""
        return torch.cat((x, F.one_hot(tasks, self.n_tasks).to(x.dtype)), dim=1)

    def encode(self, x: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent mean and log-variance of each image, given its task."""
        features = self._condition(self.encoder(x).flatten(1), tasks)
        return self.fc_mu(features), self.fc_log_var(features)

    def decode(self, z: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from latent codes, given their tasks."""
        hidden = self.decoder_input(self._condition(z, tasks)).view(len(z), self.top, 2, 2)
        return self.final(self.decoder(hidden))

    def forward(self, x: torch.Tensor, tasks: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstructions (through a reparameterised latent sample), means, log-variances."""
        mu, log_var = self.encode(x, tasks)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        return self.decode(z, tasks), mu, log_var

    def sample(self, tasks: torch.Tensor) -> torch.Tensor:
        """One image per entry of `tasks`, decoded from z ~ N(0, I) (torch's global RNG)."""
        z = torch.randn(len(tasks), self.latent_dim, device=tasks.device)
        return self.decode(z, tasks)


def vae_loss(recons: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor,
             kld_weight: float) -> torch.Tensor:
    """Per sample: mean squared reconstruction error over the pixels plus kld_weight times
    KL(N(mu, exp(log_var)) || N(0, I)) summed over the latent dimensions."""
    error = (recons.float() - x.float()).pow(2).flatten(1).mean(1)
    mu, log_var = mu.float(), log_var.float()
    kld = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(1)
    return error + kld_weight * kld
