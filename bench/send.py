"""Sending: dicom-node's C-STORE SCU (the code the outbox uses) against dcmtk's
storescu, both sending the same generated series into dcmtk's storescp, in
one run.  Prints instances/s, MB/s and the ratio.

    .venv/bin/python bench/send.py [--slices 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

from common import StoreSCP, cleanup, make_series, storescu_time, workdir

from dicom_node.config import Peer
from dicom_node.net.pynetdicom_compat import configure_process
from dicom_node.send.scu import StoreRequest, send_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    root = workdir()
    configure_process(send_chunked=True)  # what the node's sender process sets
    try:
        files = make_series(root / "series", args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        requests = [StoreRequest(i, f, "1.2.840.10008.5.1.4.1.1.2", "") for i, f in enumerate(files)]
        scp = StoreSCP(root / "received")
        peer = Peer(name="scp", ae_title="STORESCP", host="127.0.0.1", port=scp.port)
        best = {"storescu": float("inf"), "dicom-node": float("inf")}
        for _ in range(args.rounds):  # alternate, keep the best of each: the machine is noisy
            best["storescu"] = min(best["storescu"], storescu_time(scp.port, "STORESCP", files))
            start = time.perf_counter()
            outcomes = send_files(peer, requests, calling_ae="DICOM_NODE")
            best["dicom-node"] = min(best["dicom-node"], time.perf_counter() - start)
            assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok][:3]
        scp.stop()
        print(f"series: {len(files)} instances, {mb:.1f} MB")
        for name, seconds in best.items():
            print(f"{name:12s} {len(files) / seconds:8.1f} inst/s {mb / seconds:8.1f} MB/s")
        print(f"dicom-node / storescu: {best['storescu'] / best['dicom-node']:.2f}")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
