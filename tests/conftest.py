import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread; the real model gets all cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)
