"""Digests of the masks and weights that element-granularity static, DSR and SET reach after one
epoch of small-cnn on digits, computed with nothing but the API that predates granularity, so that
the same function can be run on older code (`PYTHONPATH=<checkout> python tests/element_reference.py`)
to record what test_granularity compares against."""

import hashlib

import torch
import torch.nn.functional as F

from dsrpipe.data import load_data
from dsrpipe.models import create_model
from dsrpipe.sparse import RewireSchedule, create_sparsifier

RUNS = {"static": {}, "dsr": {"prune_target": 150, "init_threshold": 0.01}, "set": {"prune_fraction": 0.1}}


def element_digests(train=None) -> dict[str, str]:
    """`train`: the digits training split, when already loaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums in another order would change the weights' last bits
    try:
        return _digests(train or load_data("digits")[0])
    finally:
        torch.set_num_threads(threads)


def _digests(train) -> dict[str, str]:
    digests = {}
    for method, options in RUNS.items():
        torch.manual_seed(0)
        model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        s = create_sparsifier(
            method, model, opt, sparsity=0.9, seed=3, schedule=RewireSchedule({0: 4}), **options
        )
        for x, y in train.batches(64, shuffle=True, augment=True, seed=0, epoch=0, drop_last=True):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            s.step()
        digest = hashlib.sha256()
        for name in sorted(s.masks):
            digest.update(s.masks[name].numpy().tobytes())
            digest.update(s.weights[name].detach().numpy().tobytes())
        digests[method] = digest.hexdigest()[:16]
    return digests


if __name__ == "__main__":
    print(element_digests())
