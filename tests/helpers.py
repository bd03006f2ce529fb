"""Shared by the sparsifier tests: random-data training steps and the masked-weights-are-zero check."""

import torch
import torch.nn.functional as F


def train_steps(model, optimizer, sparsifier, steps, seed=0, batch=16, side=8):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, 1, side, side, generator=gen)
        y = torch.randint(10, (batch,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()


def masked_weights_are_zero(sparsifier):
    return all(bool((sparsifier.weights[n][~m] == 0).all()) for n, m in sparsifier.masks.items())
