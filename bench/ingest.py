"""Ingest: the same generated 300-slice 512x512 CT series sent by dcmtk's
storescu to dcmtk's storescp, to Orthanc (synchronous storage) and to
dicom-node, all writing to disk, in one run.  Prints instances/s, MB/s and
the ratios to storescp.  dicom-node fsyncs every instance; storescp does not.

    .venv/bin/python bench/ingest.py [--slices 300] [--parallel 4]
"""

from __future__ import annotations

import argparse

from common import NodeProcess, Orthanc, StoreSCP, cleanup, make_series, storescu_time, workdir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=4, help="concurrent associations for the second round")
    ap.add_argument("--receivers", type=int, default=2, help="dicom-node receiver processes for that round")
    args = ap.parse_args()
    root = workdir()
    try:
        files = make_series(root / "series", args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {mb:.1f} MB")
        results: dict[str, float] = {}
        for parallel in (1, args.parallel):
            scp = StoreSCP(root / f"storescp-{parallel}", fork=parallel > 1)
            results[f"storescp x{parallel}"] = storescu_time(scp.port, "STORESCP", files, parallel)
            scp.stop()
            pacs = Orthanc(root / f"orthanc-{parallel}").start()
            results[f"orthanc x{parallel}"] = storescu_time(pacs.dicom_port, "ORTHANC", files, parallel)
            pacs.stop()
            receivers = 1 if parallel == 1 else args.receivers
            node = NodeProcess(root / f"node-{parallel}", routes=[],
                               node={"workers": 0, "receivers": receivers}).start()
            results[f"dicom-node x{parallel}"] = storescu_time(node.port, "DICOM_NODE", files, parallel)
            node.stop()
        print(f"{'target':22s} {'inst/s':>8s} {'MB/s':>8s} {'vs storescp':>12s}")
        for name, seconds in results.items():
            ref = results[f"storescp x{name.split(' x')[1]}"]
            print(f"{name:22s} {len(files) / seconds:8.1f} {mb / seconds:8.1f} {ref / seconds:12.2f}")
        for p in ("1", str(args.parallel)):
            print(f"dicom-node / orthanc x{p}: {results[f'orthanc x{p}'] / results[f'dicom-node x{p}']:.2f}")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
