"""Test clusters shared by the tests of this directory (started once, stopped at the end).

``slurm_cluster``: slurmctld + slurmd on localhost. ``emulated_hosts``: hosts in network namespaces with
a slurmd each (:mod:`tests.cluster.multihost`); ``hosts`` hands it to a test with every node idle.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.multihost import EmulatedCluster
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


@pytest.fixture(scope="module")
def emulated_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedCluster]:
    """Two emulated hosts with a slurmd each (and slurmctld on a third); skipped, with the reason, where
    they cannot run. Its teardown fails if anything (namespace, link, daemon) is left behind."""
    try:
        cluster = EmulatedCluster.start(tmp_path_factory.mktemp("hosts"), hosts=2)
    except ClusterUnavailable as exc:
        pytest.skip(f"no emulated hosts: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
    left = cluster.leftovers()
    assert not left, f"the emulated cluster left behind: {left}"


@pytest.fixture
def hosts(emulated_hosts: EmulatedCluster) -> EmulatedCluster:
    """The emulated cluster with every host up and every node idle (a test before may have killed one)."""
    emulated_hosts.heal()
    return emulated_hosts
