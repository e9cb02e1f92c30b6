"""Seeding: a run's random draws follow from --seed alone (not from the number of data-loader workers, the
machine's thread count or where a run was resumed), and --deterministic picks deterministic kernels.
"""
import os
import random

import numpy as np
import torch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def item_rng(key):
    """Seed torch's RNG for one item (call inside torch.random.fork_rng) from an EpochSampler's (index,
    epoch_seed) key; returns the index."""
    index, epoch_seed = key if isinstance(key, tuple) else (key, 0)
    torch.manual_seed(epoch_seed * 1_000_003 + index)
    return index


def configure_backends(deterministic):
    """cuDNN autotuning, or deterministic kernels where torch has them (the rest warn). Both ways: several runs
    in one process (tests, notebooks) must not inherit an earlier run's setting."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:  # cuBLAS reads it when its first handle is made, which is after this in a run
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
