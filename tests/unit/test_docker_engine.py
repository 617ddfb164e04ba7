"""The test engine's guard on its shared data root (no dockerd started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docker_engine import claim_data_root


def test_a_second_run_is_refused_the_data_root_until_the_first_lets_go(tmp_path: Path) -> None:
    root = tmp_path / "docker"
    first = claim_data_root(root)
    with pytest.raises(RuntimeError, match=r"another test run's dockerd uses .*CONSUL_RENDERER_DOCKER_ROOT"):
        claim_data_root(root)
    first.close()
    claim_data_root(root).close()
