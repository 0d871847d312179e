import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _release_models(request):
    """After each slow test (the model zoos), collect garbage: an extractor is in a reference cycle (its own
    ``forward`` is bound to it), so the model it shares stays alive until the cyclic collector runs, and a
    worker running the zoo's largest models (regnet_y_128gf, vit_h_14: 2.5 GB each) in a row was killed
    for memory at 12 and 23 GB."""
    yield
    if request.node.get_closest_marker("slow") is not None:
        gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop dynamo's caches: a worker running hundreds of compiling tests
    otherwise keeps every compiled graph alive (a CI worker reached 12 GB and was killed for memory)."""
    yield
    torch._dynamo.reset()
    gc.collect()


class TwoConvNet(nn.Module):
    """The classic hook recipe's example network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=(5, 5), stride=(2, 2))
        self.conv2 = nn.Conv2d(8, 8, kernel_size=(3, 3), stride=(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        return F.relu(self.conv2(y))


class SharedReLUNet(nn.Module):
    """One ReLU module called three times, plus functional ops."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        h = self.act(self.b(h)) + h
        return self.act(h * 2)


@pytest.fixture
def two_conv() -> TwoConvNet:
    return TwoConvNet()


@pytest.fixture
def shared_relu() -> SharedReLUNet:
    return SharedReLUNet()


def pytest_configure(config):
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one intra-op thread per worker: no oversubscription
        torch.set_num_threads(1)
