"""Sending: dicom-node's C-STORE SCU (the code the outbox uses) against dcmtk's
storescu, both sending the same generated series into dcmtk's storescp, in
one run.  With one association each, and with N associations (the node's
``peers[].send_associations: N``, sent from N sender processes as the outbox
does) against N storescu processes into a forking storescp.  Prints instances/s, MB/s and the ratios.

    .venv/bin/python bench/send.py [--slices 300] [--rounds 2] [--associations 1,4]
"""

from __future__ import annotations

import argparse
import time

from common import StoreSCP, cleanup, make_series, storescu_time, workdir

from dicom_node.config import Peer
from dicom_node.net.pynetdicom_compat import configure_process
from dicom_node.send.processes import SenderProcesses
from dicom_node.send.scu import StoreRequest, send_files_parallel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--associations", default="1,4", help="comma-separated association counts")
    args = ap.parse_args()
    root = workdir()
    processes = None
    configure_process(send_chunked=True)  # what the node's sender process sets
    try:
        files = make_series(root / "series", args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        requests = [StoreRequest(i, f, "1.2.840.10008.5.1.4.1.1.2", "") for i, f in enumerate(files)]
        print(f"series: {len(files)} instances, {mb:.1f} MB")
        counts = [int(a) for a in args.associations.split(",")]
        # As the outbox does: a peer's parallel associations from processes of their own.
        processes = SenderProcesses(max(counts)) if max(counts) > 1 else None
        for n in counts:
            scp = StoreSCP(root / f"received{n}", fork=n > 1)
            peer = Peer(name="scp", ae_title="STORESCP", host="127.0.0.1", port=scp.port)
            best = {"storescu": float("inf"), "dicom-node": float("inf")}
            for _ in range(args.rounds):  # alternate, keep the best of each: the machine is noisy
                best["storescu"] = min(best["storescu"],
                                       storescu_time(scp.port, "STORESCP", files, parallel=n))
                start = time.perf_counter()
                outcomes = send_files_parallel(peer, requests, associations=n,
                                               calling_ae="DICOM_NODE", processes=processes)
                best["dicom-node"] = min(best["dicom-node"], time.perf_counter() - start)
                assert all(o.ok for o in outcomes), [o.reason for o in outcomes if not o.ok][:3]
            scp.stop()
            for name, seconds in best.items():
                print(f"{n} assoc {name:12s} {len(files) / seconds:8.1f} inst/s {mb / seconds:8.1f} MB/s")
            print(f"{n} assoc dicom-node / storescu: {best['storescu'] / best['dicom-node']:.2f}")
    finally:
        if processes is not None:
            processes.close()
        cleanup(root)


if __name__ == "__main__":
    main()
