"""Ingest: the same generated 300-slice 512x512 CT series sent by dcmtk's
storescu to dcmtk's storescp, to Orthanc (synchronous storage, fsync per
file) and to dicom-node, all writing to disk, in one run, over 1, 2 and 4
concurrent associations.  Prints instances/s, MB/s, the ratios to storescp
and Orthanc, the node's scaling over its own one-association rate, the
disk's durable-write ceiling: the node's write pattern (write, fsync,
rename, fsync of the folder) alone, from as many threads, and how the
associations were spread over the node's receiver processes.  dicom-node
fsyncs every instance; storescp does not.

    .venv/bin/python bench/ingest.py [--slices 300] [--associations 1,2,4] [--receivers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from pathlib import Path

from common import NodeProcess, Orthanc, StoreSCP, cleanup, make_series, storescu_time, workdir


_ASSOCIATION_LINE = re.compile(r" (\S+) dicom_node\.\S+: association from \S+ released after "
                               r"[\d.]+ s: (\d+) instances")


def association_split(log: str) -> dict[str, list[int]]:
    """Process name -> instances of each association it served, from the
    node's one line per association."""
    split: dict[str, list[int]] = {}
    for process, instances in _ASSOCIATION_LINE.findall(log):
        split.setdefault(process, []).append(int(instances))
    return split


def durable_writes(folder: Path, files: list[Path], threads: int) -> float:
    """Seconds to write ``files`` durably the way the spool does, from ``threads``."""
    (folder / "tmp").mkdir(parents=True)
    (folder / "final").mkdir()
    data = [f.read_bytes() for f in files]

    def one(k: int) -> None:
        for i in range(k, len(data), threads):
            tmp = folder / "tmp" / f"{i}.part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.write(fd, data[i])
            os.fsync(fd)
            os.close(fd)
            os.replace(tmp, folder / "final" / f"{i}.dcm")
            dfd = os.open(folder / "final", os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)

    workers = [threading.Thread(target=one, args=(k,)) for k in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--associations", default="1,2,4", help="comma-separated concurrent associations")
    ap.add_argument("--receivers", type=int, default=2,
                    help="dicom-node receiver processes when there is more than one association")
    args = ap.parse_args()
    root = workdir()
    try:
        files = make_series(root / "series", args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"series: {len(files)} instances, {mb:.1f} MB")
        counts = [int(a) for a in args.associations.split(",")]
        results: dict[str, float] = {}
        splits: dict[int, dict[str, list[int]]] = {}
        for n in counts:
            scp = StoreSCP(root / f"storescp-{n}", fork=n > 1)
            results[f"storescp x{n}"] = storescu_time(scp.port, "STORESCP", files, n)
            scp.stop()
            pacs = Orthanc(root / f"orthanc-{n}").start()
            results[f"orthanc x{n}"] = storescu_time(pacs.dicom_port, "ORTHANC", files, n)
            pacs.stop()
            receivers = 1 if n == 1 else args.receivers
            node = NodeProcess(root / f"node-{n}", routes=[],
                               node={"workers": 0, "receivers": receivers}).start()
            results[f"dicom-node x{n}"] = storescu_time(node.port, "DICOM_NODE", files, n)
            # The line for an association is logged as its thread ends, which
            # may be just after storescu has exited.
            deadline = time.monotonic() + 5
            while (sum(map(len, association_split(node.log()).values())) < n
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            splits[n] = association_split(node.log())
            node.stop()
            results[f"durable writes x{n}"] = durable_writes(root / f"disk-{n}", files, n)
        print(f"{'target':22s} {'inst/s':>8s} {'MB/s':>8s} {'vs storescp':>12s}")
        for name, seconds in results.items():
            ref = results[f"storescp x{name.split(' x')[1]}"]
            print(f"{name:22s} {len(files) / seconds:8.1f} {mb / seconds:8.1f} {ref / seconds:12.2f}")
        for n in counts:
            node = results[f"dicom-node x{n}"]
            print(f"x{n}: dicom-node / orthanc {results[f'orthanc x{n}'] / node:.2f}, "
                  f"rate / its own x{counts[0]} rate {results[f'dicom-node x{counts[0]}'] / node:.2f}, "
                  f"/ the durable-write ceiling {results[f'durable writes x{n}'] / node:.2f}")
            print(f"x{n}: instances per association, by receiver process: "
                  + ", ".join(f"{name} {counts}" for name, counts in sorted(splits[n].items())))
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
