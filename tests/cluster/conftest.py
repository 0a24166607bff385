"""A single-node Slurm cluster shared by the tests of this directory (started once, stopped at the end)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.slurm import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """slurmctld + slurmd on localhost; the test is skipped, with the reason, where they cannot run."""
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except ClusterUnavailable as exc:
        pytest.skip(f"no Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
