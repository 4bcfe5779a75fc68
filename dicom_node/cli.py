"""The ``dicom-node`` command: serve, check-config, route test, models verify,
complete, outbox, jobs, series, echo, demo.

Options (``-c``, ``--set``) go before or after the subcommand.  Without
``-c`` the configuration is found as ``serve`` finds it ($DICOM_NODE_CONFIG,
/etc/dicom-node/node.yaml, the embedded default) and the CLI says which."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from collections.abc import Sequence

import yaml

from dicom_node import __version__
from dicom_node.config import Config, Peer, check_deployment, find_config, load_config
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.store.layout import DataDir

if TYPE_CHECKING:
    import logging

    from dicom_node.store.db import Store
    from dicom_node.store.views import StoreViews

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (with where to find help), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """-c and --set, on the top parser and again on every subcommand (into
    other names, merged by main, so both places work and add up)."""
    suffix = "_after" if after else ""
    default: Any = argparse.SUPPRESS if after else None
    parser.add_argument("-c", "--config", type=Path, dest="config" + suffix, default=default,
                        help="configuration file (default: $DICOM_NODE_CONFIG, "
                             "/etc/dicom-node/node.yaml, then the embedded conf/node.yaml)")
    parser.add_argument("--set", action="append", dest="set" + suffix,
                        default=argparse.SUPPRESS if after else [], metavar="KEY=VALUE",
                        help="override a config value (YAML value); list items by name or "
                             "index: --set node.port=11113, --set routes.ct.quiet_seconds=5")


def _sub(subparsers: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, **kwargs)
    _common(parser, after=True)
    return parser


def _parser() -> argparse.ArgumentParser:
    from dicom_node.store.db import JobState, OutboxState

    p = _Parser(prog="dicom-node", description="AI inference DICOM node")
    p.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    _common(p, after=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _sub(sub, "serve", help="run the node")
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING or ERROR")
    serve.add_argument("--json-logs", action="store_true", help="one JSON object per log line")

    _sub(sub, "check-config", help="validate the configuration (routes, models, folders, ports, "
                                   "peers) and print it")

    route = _sub(sub, "route", help="routing tools")
    route_sub = route.add_subparsers(dest="route_command", required=True)
    test = _sub(route_sub, "test", help="show which route a DICOM file matches and why")
    test.add_argument("files", nargs="+", type=Path)
    test.add_argument("--calling-ae", default="")

    models = _sub(sub, "models", help="model tools")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    _sub(models_sub, "verify", help="contract check of every model and of each route's model")
    export = _sub(models_sub,
        "export-triton", help="write a Triton model repository (config.pbtxt and model.onnx) "
                              "for the manifests")
    export.add_argument("dir", type=Path, help="the model repository to write (created if missing)")
    export.add_argument("--instance-kind", choices=["gpu", "cpu"], default="gpu",
                        help="instance group kind in config.pbtxt (default gpu)")
    export.add_argument("models", nargs="*", metavar="NAME",
                        help="models to export (default: every manifest in the models folder)")

    complete = _sub(sub, "complete", help="mark a series complete now")
    complete.add_argument("series_uid")

    outbox = _sub(sub, "outbox", help="outbox tools")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    retry = _sub(outbox_sub, "retry", help="send dead letters again")
    retry.add_argument("--destination", help="only those to this destination")
    listing = _sub(outbox_sub, "list", help="result objects to send, sent and dead, newest first")
    listing.add_argument("--state", choices=[str(s) for s in OutboxState],
                         help="only items in this state")
    listing.add_argument("--destination", help="only items to this destination")
    listing.add_argument("--job", type=int, metavar="JOB_ID", help="only items of this job")
    _listing_options(listing)

    jobs = _sub(sub, "jobs", help="list jobs; rerun one; release or discard a held one")
    jobs.add_argument("--state", choices=[str(s) for s in JobState],
                      help="list only jobs in this state")
    jobs.add_argument("--route", help="list only jobs of this route")
    _listing_options(jobs)
    action = jobs.add_mutually_exclusive_group()
    action.add_argument("--retry", type=int, metavar="JOB_ID", help="queue a finished job again")
    action.add_argument("--release", type=int, metavar="JOB_ID",
                        help="send a held (implausible) result as it is")
    action.add_argument("--discard", type=int, metavar="JOB_ID",
                        help="delete a held (implausible) result unsent")

    series = _sub(sub, "series", help="received series: sender, instances, route or why unrouted")
    series.add_argument("--state", choices=["receiving", "complete"],
                        help="only series in this state")
    series.add_argument("--route", help="only series routed to this route")
    series.add_argument("--unrouted", action="store_true", help="only series no route matched")
    _listing_options(series)

    echo = _sub(sub, "echo", help="C-ECHO a DICOM destination or peer (a folder destination: "
                                  "check it is writable)")
    echo.add_argument("destination", metavar="NAME", help="a destination or peer name")
    echo.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait for the connection and the answer (default 10)")

    demo = _sub(sub, "demo", help="send a synthetic study to the running node and show the results")
    demo.add_argument("--slices", type=int, default=8,
                      help="slices of the synthetic CT (and, at least 3, of the cine MR); default 8")
    demo.add_argument("--size", type=int, default=256,
                      help="rows and columns of the synthetic CT images (the MR uses at least 128); "
                           "default 256")
    demo.add_argument("--timeout", type=float, default=120.0,
                      help="seconds to wait for each study's results (default 120)")
    return p


def _listing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=50, help="newest rows shown (default 50)")
    parser.add_argument("--json", action="store_true", help="a JSON array instead of a table")


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DicomNodeError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = getattr(args, "config_after", None) or args.config
        if path is None:
            path, why = find_config()
            print(f"dicom-node: using {path} ({why})", file=sys.stderr)
        args.config = path
        config = load_config(path, _overrides([*args.set, *getattr(args, "set_after", [])]))
        code = _COMMANDS[args.command](config, args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except DicomNodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `dicom-node outbox list | head`: the reader has what it wanted.
        # Point stdout at /dev/null so the flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def _deployment(config: Config, args: argparse.Namespace, *, ports: bool) -> list[str]:
    """check_deployment's errors as one ConfigError line; returns the warnings."""
    errors, warnings = check_deployment(config, ports=ports)
    if errors:
        raise ConfigError(f"{args.config}: " + "; ".join(errors))
    return warnings


def _serve(config: Config, args: argparse.Namespace) -> int:
    import logging

    from dicom_node.observability.metrics_dir import create_metrics_dir, remove_metrics_dir

    # What check-config rejects, serve refuses too, before anything starts:
    # one line naming the key and the reason (main prints it, exit 2).  The
    # checks do not import prometheus_client (see the metrics dir below).
    warnings = _deployment(config, args, ports=True)

    # Receivers and workers are processes: they share metrics through files
    # (memory-backed, see metrics_dir), and prometheus-client reads the
    # variable when it is first imported, so before the imports below.
    metrics_dir, where, in_memory = create_metrics_dir(DataDir.of(config).metrics_fallback)

    from dicom_node.observability.logs import setup_logging
    from dicom_node.service import Node

    setup_logging(args.log_level, args.json_logs)
    service_log = logging.getLogger("dicom_node.service")
    service_log.info("configuration %s", args.config, extra={"config": str(args.config)})
    for warning in warnings:
        service_log.warning("%s", warning)
    level = logging.INFO if in_memory else logging.WARNING
    service_log.log(level, where)
    try:
        Node(config, log_level=args.log_level, json_logs=args.json_logs).serve_forever()
    finally:
        remove_metrics_dir(metrics_dir)
    return 0


def _check_config(config: Config, args: argparse.Namespace) -> int:
    """The checks serve runs at start; a port in use is only a warning here
    (the running node holds it)."""
    warnings = _deployment(config, args, ports=False)
    print(yaml.safe_dump(json.loads(config.model_dump_json(exclude={"base_dir"})), sort_keys=False))
    for warning in warnings:
        print(f"dicom-node: warning: {warning}", file=sys.stderr)
    print(f"configuration OK: {len(config.routes)} routes, {len(config.destinations)} destinations, "
          f"{len(config.peers)} peers; models pass their contract checks; data dir "
          f"{config.data_dir}", file=sys.stderr)
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
    """Contract check of every model in the folder, then of each route's
    model with its pipeline; one line each, non-zero exit if any failed."""
    from dicom_node.infer.engine import ModelRegistry
    from dicom_node.pipelines.base import check_pair

    if args.models_command == "export-triton":
        return _export_triton(config, args)
    registry = ModelRegistry.from_settings(config.models_dir, config.inference)
    failures = 0
    for name in registry.names():
        verdict = registry.check(name, live=True)
        failures += not verdict.ok
        if verdict.ok:
            model = registry.get(name)
            print(f"model {name} {model.manifest.version}: OK on {model.provider}: {verdict.detail}")
        else:
            again = " (transient: the server may answer later)" if verdict.transient else ""
            print(f"model {name}: FAILED: {verdict.detail}{again}")
    for route in config.routes:
        if route.model not in registry.names():
            problems = [f"no manifest {route.model}.yaml in {config.models_dir}"]
        elif not registry.check(route.model).ok:
            problems = [f"model {route.model} failed its check (above)"]
        else:
            problems = check_pair(route.pipeline, registry.manifest(route.model))
        failures += bool(problems)
        verdict_text = "OK" if not problems else "FAILED: " + "; ".join(problems)
        print(f"route {route.name} ({route.pipeline} with {route.model}): {verdict_text}")
    return 1 if failures else 0


def _export_triton(config: Config, args: argparse.Namespace) -> int:
    """One Triton model per manifest, from the very files the manifests name
    (their sha256 checked first)."""
    from dicom_node.errors import DicomNodeError
    from dicom_node.infer.engine import ModelRegistry
    from dicom_node.infer.triton_repo import export_model

    registry = ModelRegistry.from_settings(config.models_dir, config.inference)
    names = args.models or registry.names()
    kind = "KIND_GPU" if args.instance_kind == "gpu" else "KIND_CPU"
    failures = 0
    for name in names:
        try:
            onnx_path = registry.verify(name)
            folder = export_model(registry.manifest(name), onnx_path, args.dir,
                                  config.inference.batch_size, kind)
        except DicomNodeError as exc:
            print(f"model {name}: FAILED: {exc}")
            failures += 1
            continue
        print(f"model {name}: {folder / 'config.pbtxt'}, {folder / '1' / 'model.onnx'}")
    return 1 if failures else 0


def _db_path(config: Config) -> Path:
    """The node's database; an error, not a new empty one, when the node has
    never run with this configuration."""
    path = DataDir.of(config).db
    if not path.is_file():
        raise DicomNodeError(f"no node database at {path}: has `dicom-node serve` run with this "
                             "configuration? (node.data_dir; or give -c)")
    return path


def _store(config: Config) -> Store:
    from dicom_node.store.db import Store

    return Store(_db_path(config))


def _views(config: Config) -> StoreViews:
    """Read-only queries for the listings."""
    from dicom_node.store.views import StoreViews

    return StoreViews(_db_path(config))


# -- tables ---------------------------------------------------------------------


def _when(ts: float | None) -> str:
    return "" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def _table(headers: Sequence[str], rows: list[Sequence[Any]]) -> None:
    """Aligned columns under a header; the last column is not padded."""
    cells = [[str(c) for c in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(("  ".join(v.ljust(w) for v, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1]).rstrip())
    if not rows:
        print("(none)", file=sys.stderr)


def _known(config: Config, what: str, value: str | None, names: list[str]) -> None:
    """A filter naming something that does not exist is an error, not an empty list."""
    if value is not None and value not in names:
        raise DicomNodeError(f"--{what} {value!r}: no such {what} in the configuration "
                             f"({what}s: {', '.join(names) or 'none'})")


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
        _known(config, "destination", args.destination, [d.name for d in config.destinations])
        n = store.retry_dead(args.destination)
        print(f"{n} dead letters queued again")
        return 0
    _known(config, "destination", args.destination, [d.name for d in config.destinations])
    items = _views(config).outbox_items(state=args.state, destination=args.destination, job_id=args.job,
                                        limit=args.limit)
    if args.json:
        print(json.dumps(items, indent=1))
        return 0
    now = time.time()
    _table(["ID", "JOB", "DESTINATION", "STATE", "TRIES", "QUEUED", "SENT", "NEXT TRY", "OBJECT",
            "LAST ERROR"],
           [(i["id"], i["job_id"], i["destination"], i["state"], i["attempts"], _when(i["created_at"]),
             _when(i["sent_at"]),
             "in " + _duration(max(0.0, i["next_at"] - now)) if i["state"] == "pending" else "",
             Path(i["path"]).name, i["last_error"] or "") for i in items])
    return 0


def _jobs(config: Config, args: argparse.Namespace) -> int:
    store = _store(config)
    if args.retry is not None:
        # A held job raises JobStateError: main prints it and exits 2.
        ok = store.requeue_job(args.retry)
        print(f"job {args.retry} " + ("queued again" if ok else "not found or still queued/running"))
        return 0 if ok else 1
    if args.release is not None:
        return _release(store, args.release)
    if args.discard is not None:
        return _discard(store, args.discard)
    _known(config, "route", args.route, [r.name for r in config.routes])
    jobs = _views(config).job_rows(state=args.state, route=args.route, limit=args.limit)
    now = time.time()
    for job in jobs:
        job["series_uids"] = json.loads(job["series_uids"])
        end = job["finished_at"] or (now if job["state"] == "running" else None)
        started = job["started_at"]
        job["duration_s"] = None if started is None or end is None else round(end - started, 3)
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    _table(["ID", "STATE", "ROUTE", "PIPELINE", "MODEL", "FROM", "SERIES", "CREATED", "DURATION",
            "TRIES", "REASON"],
           [(j["id"], j["state"], j["route"], j["pipeline"], j["model"], j["calling_ae"],
             len(j["series_uids"]), _when(j["created_at"]), _duration(j["duration_s"]),
             j["attempts"], j["reason"] or "") for j in jobs])
    return 0


def _series(config: Config, args: argparse.Namespace) -> int:
    _known(config, "route", args.route, [r.name for r in config.routes])
    rows = _views(config).series_rows(state=args.state, route=args.route, unrouted=args.unrouted,
                                      limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    _table(["SERIES", "MODALITY", "FROM", "TO", "INSTANCES", "FIRST", "LAST", "STATE", "ROUTE"],
           [(r["series_uid"], r["modality"], r["calling_ae"], r["called_ae"], r["instance_count"],
             _when(r["first_at"]), _when(r["last_at"]), r["state"],
             r["route"] or (f"unrouted: {r['unrouted_reason']}" if r["state"] == "complete" else ""))
            for r in rows])
    return 0


def _release(store: Store, job_id: int) -> int:
    """Send a held result: a JobStateError (not held) reaches main, exit 2."""
    items = store.release_job(job_id)
    # An audit trail of the operator's decision; the reason reads
    # "released by operator after: <why it was held>".
    job = store.job(job_id)
    _audit_log().warning("job %d %s (operator %s); %d result objects queued", job_id,
                         job.reason if job else "", _operator(), len(items))
    print(f"job {job_id} released by operator: {len(items)} outbox items queued to send")
    return 0


def _discard(store: Store, job_id: int) -> int:
    """Delete a held result unsent: rows first, then the files."""
    from dicom_node.store.retention import remove_result_files

    removed = remove_result_files(store.discard_job(job_id))
    _audit_log().warning("job %d discarded by operator %s; %d result files deleted unsent",
                         job_id, _operator(), removed)
    print(f"job {job_id} discarded: {removed} result files deleted, nothing sent")
    return 0


def _operator() -> str:
    """Who ran the command, for the audit line (the OS user)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def _audit_log() -> logging.Logger:
    """The CLI configures no logging; operator decisions go to stderr in any case."""
    import logging

    log = logging.getLogger("dicom_node.cli")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    return log


def _demo(config: Config, args: argparse.Namespace) -> int:
    try:
        from dicom_node.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "dicom_node_synthetic":
            raise
        # The phantoms are a separate package, not part of the runtime install.
        print("dicom-node demo: the synthetic phantoms are not installed; "
              "run `make setup` or `pip install ./synthetic` from the source tree", file=sys.stderr)
        return 2

    return run_demo(config, slices=args.slices, size=args.size, timeout_s=args.timeout)


def _echo(config: Config, args: argparse.Namespace) -> int:
    """C-ECHO a DICOM destination's peer (or a peer by name), calling as the
    node does when it sends results; a folder destination is checked for
    writing.  0 when it answers, 1 with the reason when not."""
    from dicom_node.config import FolderDestination, SenderDestination, _writable_dir

    name = args.destination
    dest = next((d for d in config.destinations if d.name == name), None)
    peer = next((p for p in config.peers if p.name == name), None)
    if dest is None and peer is None:
        raise DicomNodeError(f"echo {name!r}: no destination or peer of that name (destinations: "
                             f"{', '.join(d.name for d in config.destinations) or 'none'}; peers: "
                             f"{', '.join(p.name for p in config.peers) or 'none'})")
    if isinstance(dest, FolderDestination):
        folder = config.folder_path(dest)
        problem = _writable_dir(folder)
        if problem:
            print(f"dicom-node: echo {name}: folder destination FAILED: {problem}", file=sys.stderr)
            return 1
        print(f"echo {name}: folder {folder} is writable")
        return 0
    if dest is not None and dest.kind == "dicomweb":
        from dicom_node.send.dicomweb import echo_dicomweb

        ok, detail = echo_dicomweb(dest)
        if not ok:
            print(f"dicom-node: echo {name}: dicomweb destination FAILED: {detail}", file=sys.stderr)
            return 1
        print(f"echo {name}: {detail}")
        return 0
    if isinstance(dest, SenderDestination):
        raise DicomNodeError(f"echo {name!r}: this destination sends results back to whichever peer "
                             "sent the study; echo that peer by name (peers: "
                             f"{', '.join(p.name for p in config.peers) or 'none'})")
    if dest is not None:
        peer = config.peer(dest.peer)
    assert peer is not None
    where = f"{peer.ae_title}@{peer.host}:{peer.port}" + (" (TLS)" if peer.tls else "")
    started = time.monotonic()
    problem = _c_echo(peer, config.node.ae_title, args.timeout)
    if problem:
        print(f"dicom-node: echo {name}: {where} FAILED: {problem}", file=sys.stderr)
        return 1
    print(f"echo {name}: {where} answered C-ECHO in {time.monotonic() - started:.2f} s "
          f"(calling AE {config.node.ae_title})")
    return 0


def _c_echo(peer: Peer, calling_ae: str, timeout_s: float) -> str | None:
    """Why a C-ECHO to ``peer`` failed, or None (dicom_node/send/echo.py, as
    the status page's echo action, after a TCP probe for the precise reason)."""
    import logging
    import socket

    from dicom_node.send.echo import echo_peer

    try:
        socket.create_connection((peer.host, peer.port), timeout=timeout_s).close()
    except socket.gaierror as exc:
        return f"{peer.host} does not resolve ({exc.strerror})"
    except TimeoutError:
        return f"no TCP connection within {timeout_s:g} s"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
    quiet = logging.getLogger("pynetdicom")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its ERROR lines; the reason is printed instead
    try:
        result = echo_peer(peer, calling_ae=calling_ae, timeout_s=timeout_s)
    finally:
        quiet.setLevel(level)
    return None if result.ok else result.detail


_COMMANDS = {
    "serve": _serve, "check-config": _check_config, "route": _route, "models": _models,
    "complete": _complete, "outbox": _outbox, "jobs": _jobs, "series": _series,
    "echo": _echo, "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())
