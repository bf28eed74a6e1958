from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# No per-example deadline: CI shares two cores with spawned ranks and children,
# and a slow example is not a wrong one (speed is shown by ``gradgate bench``).
settings.register_profile("gradgate", deadline=None)
settings.load_profile("gradgate")

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", help="rewrite tests/golden/*.txt")


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """Compare text with ``tests/golden/NAME``; only ``--regen-golden`` writes the file.

    A missing golden file fails: writing it here would make the first run of a
    broken build its own reference.
    """
    regen = bool(request.config.getoption("--regen-golden"))

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if regen:
            path.write_text(text + "\n")
        elif not path.exists():
            pytest.fail(
                f"golden file {path} is missing; review the output, then write it with "
                f"`python -m pytest --regen-golden {request.node.nodeid}`"
            )
        assert text + "\n" == path.read_text()

    return check


@pytest.fixture
def one_rank(tmp_path: Path) -> Any:
    """A one-rank gloo process group for the test (DDP wrappers need one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
