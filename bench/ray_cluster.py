"""A Ray cluster of several nodes on this one machine, for timing `--ray` against the local path.

    python bench/ray_cluster.py --nodes 2 --cpus 1 --address-file /tmp/ray_address

Starts a head and NODES-1 more nodes (Ray's own test helper, each a separate set of
processes with CPUS cores, every address loopback), writes the head's address to
ADDRESS_FILE, and holds the cluster until interrupted. Then, e.g.:

    sats ablation DATA --out STUDY ... --ray $(cat /tmp/ray_address)
    sats predict -i FOLDER -o OUT -m RUN --ray $(cat /tmp/ray_address) --ray-workers 2

A real cluster is started with `ray start --head` and `ray start --address HEAD:6379` on
each machine (README, "Scaling out").
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when Ray is imported: nodes on 127.0.0.1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--address-file", type=Path, required=True)
    args = ap.parse_args()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus)
    cluster.wait_for_nodes()
    args.address_file.write_text(cluster.address)
    print(f"{args.nodes} node(s) at {cluster.address}", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    cluster.shutdown()


if __name__ == "__main__":
    main()
