import os

# Headless pygame everywhere in the suite; set before any test imports pygame.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny-config tests: intra-op threads only add synchronisation, and on a busy 2-core machine a second
# thread waiting for a core made ops ~30x slower (measured). One thread for the whole suite.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
