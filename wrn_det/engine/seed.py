"""Seeding of every random-number generator the project uses."""
import os
import random
from datetime import datetime

import numpy as np
import torch


def seed_all(seed: int) -> int:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA).

    A negative seed picks one from the time and the process id, as detectron2 does.
    Returns the seed used.
    """
    if seed is None or seed < 0:
        seed = (os.getpid() + int(datetime.now().strftime("%S%f")) + int.from_bytes(os.urandom(2), "big")) % (2**31)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return seed
