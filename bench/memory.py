"""Bounded memory: the receiver's peak RSS for a 50- and a 2,000-instance
series (it should stay flat: instances go to disk, not memory), and a
worker's peak RSS for CT series of two sizes against the size of the float32
volume it processes.

    .venv/bin/python bench/memory.py
"""

from __future__ import annotations

import subprocess

from common import NodeProcess, cleanup, storescu_time, wait_for, workdir, write_datasets

import numpy as np

from dicom_node_synthetic.dicom_ct import ct_series


def _peak_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def receiver_peak(root, n: int) -> int:
    vol = np.random.default_rng(0).normal(0, 20, (n, 64, 64)).astype(np.float32)
    files = write_datasets(root / f"series-{n}", ct_series(vol, seed=f"mem-{n}"))
    node = NodeProcess(root / f"recv-{n}", routes=[], node={"workers": 0}).start()
    storescu_time(node.port, "DICOM_NODE", files)
    peak = _peak_kib(node.proc.pid)
    node.stop()
    return peak


def worker_peak(root, slices: int) -> tuple[int, float]:
    base = np.random.default_rng(1).normal(40, 20, (512, 512)).astype(np.float32)
    vol = np.repeat(base[None], slices, axis=0)
    vol[:, 200:300, 200:300] = 350  # a blood pool for the quality report
    vol[:, 20:60, 20:60] = -100  # and fat
    files = write_datasets(root / f"ct-{slices}", ct_series(vol, seed=f"memw-{slices}"))
    node = NodeProcess(root / f"work-{slices}", routes=[{
        "name": "ct", "pipeline": "ct_denoise", "model": "ct_denoise", "destinations": ["out"],
        "quiet_seconds": 1, "match": [{"keyword": "Modality", "equals": "CT"}]}]).start()
    storescu_time(node.port, "DICOM_NODE", files)
    store = node.store()
    wait_for(lambda: any(j.state in ("done", "failed") for j in store.jobs()), 600, 0.2, "job finished")
    peak = max(_peak_kib(p) for p in _children(node.proc.pid))
    node.stop()
    return peak, slices * 512 * 512 * 4 / 1024


def main() -> None:
    root = workdir()
    try:
        small, large = receiver_peak(root, 50), receiver_peak(root, 2000)
        print(f"receiver peak RSS: 50 instances {small / 1024:.0f} MiB, 2000 instances {large / 1024:.0f} MiB "
              f"(ratio {large / small:.2f})")
        for slices in (16, 64):
            peak, volume = worker_peak(root, slices)
            print(f"worker peak RSS for {slices} slices of 512x512: {peak / 1024:.0f} MiB; "
                  f"float32 volume {volume / 1024:.0f} MiB; peak / volume {peak / volume:.1f}")
    finally:
        cleanup(root)


if __name__ == "__main__":
    main()
