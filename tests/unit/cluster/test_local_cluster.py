"""The local multi-node cluster's `ray start` commands: a head and workers on one machine, each with ports of its
own (the defaults collide between nodes on one address) and its own CPU count."""
from __future__ import annotations

from cluster.local_cluster import _ports, node_command


def test_head_and_worker_commands_join_one_cluster_with_ports_of_their_own():
    head_ports, worker_ports = _ports(), _ports()
    head = node_command(True, 6390, 2, head_ports)
    worker = node_command(False, 6390, 1, worker_ports)
    assert "--head" in head and "--port=6390" in head and "--num-cpus=2" in head
    assert "--address=127.0.0.1:6390" in worker and "--num-cpus=1" in worker and "--head" not in worker
    flags = lambda cmd: {a.split("=")[0]: a.split("=")[1] for a in cmd if a.startswith("--") and "port" in a}
    h, w = flags(head), flags(worker)
    shared = {k for k in set(h) & set(w) if h[k] == w[k]}
    assert shared == set(), shared  # no port both nodes would bind
    assert "--block" in head and "--block" in worker  # foreground: `stop` signals their process groups
