"""The ``dicom-node`` command: serve, check-config, route test, models verify,
complete, outbox retry, jobs, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from dicom_node import __version__
from dicom_node.config import DEFAULT_CONFIG, Config, load_config
from dicom_node.errors import DicomNodeError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dicom-node", description="AI inference DICOM node")
    p.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                   help="configuration file (default: the embedded conf/node.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set node.port=11113 (YAML value)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the node")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--json-logs", action="store_true", help="one JSON object per log line")

    sub.add_parser("check-config", help="validate the configuration and print it")

    route = sub.add_parser("route", help="routing tools")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    test = route_sub.add_parser("test", help="show which route a DICOM file matches and why")
    test.add_argument("files", nargs="+", type=Path)
    test.add_argument("--calling-ae", default="")

    models = sub.add_parser("models", help="model tools")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("verify", help="load every model and run it once on zeros")

    complete = sub.add_parser("complete", help="mark a series complete now")
    complete.add_argument("series_uid")

    outbox = sub.add_parser("outbox", help="outbox tools")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    retry = outbox_sub.add_parser("retry", help="send dead letters again")
    retry.add_argument("--destination")
    outbox_sub.add_parser("list", help="list outbox items")

    jobs = sub.add_parser("jobs", help="list jobs, or rerun one")
    jobs.add_argument("--state")
    jobs.add_argument("--retry", type=int, metavar="JOB_ID", help="queue a finished job again")

    demo = sub.add_parser("demo", help="send a synthetic study to the running node and show the results")
    demo.add_argument("--slices", type=int, default=8)
    demo.add_argument("--size", type=int, default=256)
    demo.add_argument("--timeout", type=float, default=120.0)
    return p


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DicomNodeError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args.set))
        return _COMMANDS[args.command](config, args)
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(config: Config, args: argparse.Namespace) -> int:
    import os
    import shutil

    # Receivers and workers are processes: they share metrics through files,
    # and prometheus-client reads this variable when it is first imported.
    metrics_dir = config.data_dir / ".metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    from dicom_node.observability.logs import setup_logging
    from dicom_node.service import Node

    setup_logging(args.log_level, args.json_logs)
    Node(config, log_level=args.log_level, json_logs=args.json_logs).serve_forever()
    return 0


def _check_config(config: Config, args: argparse.Namespace) -> int:
    print(yaml.safe_dump(json.loads(config.model_dump_json(exclude={"base_dir"})), sort_keys=False))
    print(f"configuration OK: {len(config.routes)} routes, {len(config.destinations)} destinations, "
          f"{len(config.peers)} peers", file=sys.stderr)
    return 0


def _route(config: Config, args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from dicom_node.route.router import RouteFacts, decide

    for path in args.files:
        try:
            header = dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next file
            print(f"{path}: cannot read: {exc}")
            continue
        decision = decide(list(config.routes), RouteFacts(header, calling_ae=args.calling_ae))
        chosen = decision.route.name if decision.route else "none (unrouted)"
        print(f"{path}: route {chosen}")
        for outcome in decision.outcomes:
            print(f"  {outcome.route}: {'MATCH' if outcome.matched else 'no - ' + outcome.reason}")
    return 0


def _models(config: Config, args: argparse.Namespace) -> int:
    import numpy as np

    from dicom_node.infer.engine import ModelRegistry

    inf = config.inference
    registry = ModelRegistry(config.models_dir, inf.providers, inf.device_id)
    failures = 0
    for name in registry.names():
        try:
            model = registry.get(name)
            spec = model.manifest.inputs[0]
            size = model.manifest.input_size or (64, 64)
            shape = [1 if d is None else d for d in spec.shape]
            shape[-2:] = [d if d is not None else s for d, s in zip(spec.shape[-2:], size)]
            outputs = model.run({spec.name: np.zeros(shape, np.float32)})
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items())
            print(f"{name} {model.manifest.version}: OK on {model.provider} ({shapes})")
        except DicomNodeError as exc:
            failures += 1
            print(f"{name}: FAILED: {exc}")
    return 1 if failures else 0


def _store(config: Config):
    from dicom_node.store.db import Store

    return Store(config.data_dir / "node.db")


def _complete(config: Config, args: argparse.Namespace) -> int:
    store = _store(config)
    if store.request_completion(args.series_uid):
        print(f"series {args.series_uid} will complete at the node's next pass")
        return 0
    series = store.series(args.series_uid)
    print(f"series {args.series_uid}: " + ("unknown" if series is None else f"already {series.state}"),
          file=sys.stderr)
    return 1


def _outbox(config: Config, args: argparse.Namespace) -> int:
    store = _store(config)
    if args.outbox_command == "retry":
        n = store.retry_dead(args.destination)
        print(f"{n} dead letters queued again")
        return 0
    for item in store.outbox_items():
        print(f"{item.id}\tjob {item.job_id}\t{item.destination}\t{item.state}\t"
              f"attempts {item.attempts}\t{item.sop_uid}\t{item.last_error or ''}")
    return 0


def _jobs(config: Config, args: argparse.Namespace) -> int:
    store = _store(config)
    if args.retry is not None:
        ok = store.requeue_job(args.retry)
        print(f"job {args.retry} " + ("queued again" if ok else "not found or still queued/running"))
        return 0 if ok else 1
    for job in store.jobs(args.state):
        print(f"{job.id}\t{job.state}\t{job.route}\t{job.pipeline}\tattempts {job.attempts}\t"
              f"{','.join(job.series_uids)}\t{job.reason or ''}")
    return 0


def _demo(config: Config, args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    return run_demo(config, slices=args.slices, size=args.size, timeout_s=args.timeout)


_COMMANDS = {
    "serve": _serve, "check-config": _check_config, "route": _route, "models": _models,
    "complete": _complete, "outbox": _outbox, "jobs": _jobs, "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())
