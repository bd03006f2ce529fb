"""Shared by the tests: a small CNN, random-data training steps, the masked-weights-are-zero
and exact-resume checks, and small image-folder datasets written to disk."""

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def small_net(width=16):
    """Three convs and two linears: the middle ones are sparse by default."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, 4 * width),
        nn.ReLU(),
        nn.Linear(4 * width, 10),
    )


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


def assert_resume_is_exact(build, first_steps, second_steps):
    """Train `first_steps`, save model/optimizer/sparsifier, load them into freshly built
    objects (other seeds, other settings) and train `second_steps`: the weights and the
    sparsifier's state must equal an uninterrupted run's, bit for bit. `build(fresh)` returns
    (model, optimizer, sparsifier). Returns both runs' sparsifier states, for more checks."""

    def run(resume):
        torch.manual_seed(0)
        model, optimizer, sparsifier = build(fresh=False)
        train_steps(model, optimizer, sparsifier, first_steps, seed=1)
        if resume:
            state = (model.state_dict(), optimizer.state_dict(), sparsifier.state_dict())
            torch.manual_seed(123)
            model, optimizer, sparsifier = build(fresh=True)
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
            sparsifier.load_state_dict(state[2])
        train_steps(model, optimizer, sparsifier, second_steps, seed=2)
        return model.state_dict(), sparsifier.state_dict()

    (w1, s1), (w2, s2) = run(False), run(True)
    assert s1["iteration"] == s2["iteration"] == first_steps + second_steps
    assert s1.keys() == s2.keys()
    for name in s1["masks"]:
        assert torch.equal(s1["masks"][name], s2["masks"][name])
    for key in w1:
        assert torch.equal(w1[key], w2[key]), key
    return s1, s2


def png(size=(12, 12), mode="RGB", seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(2) if mode == "L" else pixels, mode).save(buffer, "PNG")
    return buffer.getvalue()


def image_tree(classes=("cat", "dog", "frog"), per_split=None, mode="RGB", top="", size=(12, 12)):
    """{relative path: bytes} of a small train/test image tree, optionally under a top folder."""
    per_split = per_split or {"train": 4, "test": 2}
    names = [
        f"{top}{split}/{name}/{i}.png"
        for split, count in per_split.items()
        for name in classes
        for i in range(count)
    ]
    return {name: png(size, mode, seed) for seed, name in enumerate(names)}


def write_tree(root: Path, tree: dict) -> Path:
    for name, content in tree.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root
