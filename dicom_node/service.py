"""``dicom-node serve``: one process that receives, completes, routes and
sends, plus worker processes that run the pipelines.

Stages talk through the store, so the same pieces could run one process per
role; this is the embedded default: one command, one data dir, nothing else
to install.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from multiprocessing.process import BaseProcess

from prometheus_client import CollectorRegistry

from dicom_node.complete.completer import Completer
from dicom_node.config import Config
from dicom_node.infer.engine import ModelRegistry
from dicom_node.pipelines.base import check_pair
from dicom_node.net import pynetdicom_compat
from dicom_node.net.listener import SharedListener, open_shared_listener
from dicom_node.observability.http import HealthServer
from dicom_node.observability.status import StatusPage
from dicom_node.observability.logs import RepeatLog, setup_logging
from dicom_node.observability.metrics import (MULTIPROC_ENV, Metrics, RuntimeCollector,
                                              StoreCollector, exposition_registry)
from dicom_node.receive.scp import Receiver, reconcile_spool
from dicom_node.send.outbox import Dispatcher
from dicom_node.store.db import Store
from dicom_node.store.layout import DataDir
from dicom_node.store.retention import run_retention
from dicom_node.store.spool import Spool

__all__ = ["Node", "worker_main", "receiver_main"]

log = logging.getLogger("dicom_node.service")


def worker_main(config: Config, name: str, log_level: str, json_logs: bool) -> None:
    """Entry point of a worker process."""
    from dicom_node.infer.worker import Worker
    from dicom_node.pipelines.base import configure_threads

    setup_logging(log_level, json_logs)
    configure_threads()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    data = DataDir.of(config)
    Worker(config, Store(data.db), name, Metrics(CollectorRegistry()), data=data).run_forever(stop)


def receiver_main(config: Config, name: str, log_level: str, json_logs: bool,
                  listener: SharedListener) -> None:
    """Entry point of an extra receiver process accepting from the node's
    listening socket (passed by the parent)."""
    setup_logging(log_level, json_logs)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    data = DataDir.of(config)
    store = Store(data.db, synchronous="NORMAL")
    spool = Spool(data.spool)
    # Process-wide: received datasets go to files in the spool's .tmp.
    pynetdicom_compat.configure_process(send_chunked=False, receive_tmp_dir=spool.tmp)
    receiver = Receiver(config, store, spool,
                        Metrics(CollectorRegistry()), listener=listener, warn=False)
    receiver.start()
    stop.wait()
    receiver.stop()


def _forget_process(pid: int | None) -> None:
    """Drop a dead process's live gauges from the shared metrics files."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream


@dataclass
class _WorkerSlot:
    name: str
    role: str = "worker"
    receiver_index: int = 0  # its post on the shared listener's board (0: the node's own)
    process: BaseProcess | None = None
    restarts: int = 0
    last_start: float = 0.0


@dataclass
class Node:
    config: Config
    log_level: str = "INFO"
    json_logs: bool = False
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.data = data = DataDir.of(self.config)
        data.root.mkdir(parents=True, exist_ok=True)
        self.store = Store(data.db)
        self.spool = Spool(data.spool)
        # Process-wide pynetdicom switches, set once here: results are sent as
        # written, received datasets go to files in the spool's .tmp.
        pynetdicom_compat.configure_process(send_chunked=True, receive_tmp_dir=self.spool.tmp)
        self.metrics = Metrics(self.registry)
        self.exposed = exposition_registry(self.registry)
        self.exposed.register(StoreCollector(self.store, data.root,
                                             min_free_bytes=self.config.node.min_free_bytes))
        self.exposed.register(RuntimeCollector())
        self.receive_store = Store(data.db, synchronous="NORMAL")
        node = self.config.node
        # Several receiver processes accept from one listening socket.
        self.listener = (open_shared_listener(node.host, node.port, node.receivers)
                         if node.receivers > 1 else None)
        self.receiver = Receiver(self.config, self.receive_store, self.spool, self.metrics,
                                 listener=self.listener)
        self.completer = Completer(self.config, self.store, self.metrics, data=data)
        self.dispatcher = Dispatcher(self.config, self.store, self.metrics, data=data,
                                     log_level=self.log_level, json_logs=self.json_logs)
        self.stop_event = threading.Event()
        self.model_problems: dict[str, str] = {}
        self._threads: list[threading.Thread] = []
        self._workers = [_WorkerSlot(f"worker-{i}") for i in range(self.config.node.workers)]
        self._workers += [_WorkerSlot(f"receiver-{i}", role="receiver", receiver_index=i)
                          for i in range(1, self.config.node.receivers)]
        self._ctx = mp.get_context("spawn")
        status = StatusPage(self.config, self.store, lambda: self.http.readiness(),
                            below_watermark=self.receiver.watermark.below, registry=self.exposed)
        self.http = HealthServer(self.config.node.http.host, self.config.node.http.port,
                                 self.exposed, self._checks(), status=status)

    # -- start and stop --------------------------------------------------------

    def start(self) -> None:
        removed = self.spool.clean_temporary()
        if removed:
            log.info("removed %d partial files left by an interrupted write", removed)
        found = reconcile_spool(self.spool, self.store)
        if found:
            log.warning("spool reconciliation: %s", found.describe())
        requeued = self.store.requeue_running(max_attempts=self.config.jobs.max_attempts,
                                              reason="node stopped while the job ran")
        if requeued:
            log.info("requeued %d jobs interrupted by the last stop: %s", len(requeued), requeued)
        self._check_models()
        self.receiver.start()
        self.http.start()
        self._spawn_thread("completer", self._complete_loop)
        self._spawn_thread("outbox", lambda: self.dispatcher.run_forever(self.stop_event))
        self._spawn_thread("retention", self._retention_loop)
        for slot in self._workers:
            self._start_worker(slot)

    def _spawn_thread(self, name: str, target: Callable[[], object]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        self.start()
        while not self.stop_event.wait(1.0):
            self._supervise()
        self.shutdown()

    def shutdown(self, grace_s: float = 30.0) -> None:
        log.info("stopping: no new associations; waiting for running jobs (up to %.0f s)", grace_s)
        self.stop_event.set()
        self.receiver.stop()
        for slot in self._workers:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()  # SIGTERM: the worker ends after its current job
        deadline = time.time() + grace_s
        for slot in self._workers:
            if slot.process is not None:
                slot.process.join(max(0.1, deadline - time.time()))
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join(5)
        requeued = self.store.requeue_running(max_attempts=self.config.jobs.max_attempts + 1)
        if requeued:
            log.info("requeued %d unfinished jobs for the next start", len(requeued))
        for thread in self._threads:
            thread.join(5)
        self.dispatcher.close()
        self.http.stop()
        log.info("stopped")

    # -- loops -----------------------------------------------------------------

    def _complete_loop(self) -> None:
        # A full disk or a locked database fails every pass the same way:
        # one line with the traceback, then a count, not one every 0.5 s.
        failures = RepeatLog(log, logging.ERROR)
        while not self.stop_event.is_set():
            try:
                self.completer.run_once()
                failures.clear("completion passes work again")
            except Exception as exc:  # noqa: BLE001 - edge of the stage: log and go on
                failures.report(f"completion pass failed; retrying: {type(exc).__name__}: {exc}",
                                key=f"{type(exc).__name__}: {exc}", exc_info=True)
            self.stop_event.wait(0.5)

    # -- retention: once at start, then every retention.interval_s ------------

    def _retention_loop(self) -> None:
        settings = self.config.retention
        failures = RepeatLog(log, logging.ERROR)
        while not self.stop_event.is_set():
            try:
                run_retention(self.store, self.data, spool_days=settings.spool_days,
                              results_days=settings.results_days)
                failures.clear("retention passes work again")
            except Exception as exc:  # noqa: BLE001 - edge of the stage: log and try next time
                failures.report(f"retention pass failed; trying again every "
                                f"{settings.interval_s:.0f} s: {type(exc).__name__}: {exc}",
                                key=f"{type(exc).__name__}: {exc}", exc_info=True)
            self.stop_event.wait(settings.interval_s)

    def _start_worker(self, slot: _WorkerSlot) -> None:
        args: tuple[Any, ...] = (self.config, slot.name, self.log_level, self.json_logs)
        if slot.role == "worker":
            proc = self._ctx.Process(target=worker_main, name=slot.name, args=args)
        else:  # spawn passes the socket by duplicating its descriptor
            if self.listener is None:
                raise RuntimeError(f"{slot.name}: no shared listener (node.receivers is 1)")
            listener = self.listener.for_process(slot.receiver_index)
            proc = self._ctx.Process(target=receiver_main, name=slot.name, args=(*args, listener))
        proc.start()
        slot.process = proc
        slot.last_start = time.time()

    def _supervise(self) -> None:
        for slot in self._workers:
            proc = slot.process
            if proc is None or proc.is_alive() or self.stop_event.is_set():
                continue
            log.error("%s died (exit code %s); restarting it", slot.name, proc.exitcode)
            _forget_process(proc.pid)
            if slot.role == "worker":
                self.store.requeue_running(slot.name, self.config.jobs.max_attempts,
                                           reason=f"worker died (exit code {proc.exitcode})")
            elif self.listener is not None:
                self.listener.for_process(slot.receiver_index).mark_listening(False)
            slot.restarts += 1
            self._start_worker(slot)

    # -- readiness ---------------------------------------------------------------

    def _check_models(self) -> None:
        """The contract check of every model a route uses, as the workers run
        it when they load the model, plus whether the route's pipeline can use
        it; the verdicts stay for /readyz, one check per model."""
        registry = ModelRegistry.from_settings(self.config.models_dir, self.config.inference)
        # Kept for /readyz: a remote model is asked again at each check.
        self._model_registry = registry
        self._remote_lock = threading.Lock()
        for name in sorted({r.model for r in self.config.routes}):
            verdict = registry.check(name)
            if verdict.transient:
                log.warning("model %s: %s; /readyz reports it until the server answers", name,
                            verdict.detail)
            problems = [] if verdict.ok or verdict.transient else [verdict.detail]
            if verdict.ok or verdict.transient:
                manifest = registry.manifest(name)
                for route in self.config.routes:
                    if route.model == name:
                        problems += [f"route {route.name}: {p}" for p in check_pair(route.pipeline, manifest)]
            if problems:
                self.model_problems[name] = "; ".join(problems)
                log.error("model %s cannot be used: %s; its routes' jobs will fail", name,
                          self.model_problems[name])
            elif verdict.ok:
                log.info("model %s passed its contract check (%s)", name, verdict.detail)

    def _checks(self) -> dict[str, Callable[[], str | None]]:
        def store() -> str | None:
            # Both really write: a database row, and a synced file in the
            # spool, so a full or read-only file system shows here.
            problems = []
            for what, probe in (("database", self.store.check_writable),
                                ("spool", self.spool.check_writable)):
                try:
                    probe()
                except (OSError, sqlite3.Error) as exc:
                    problems.append(f"{what} not writable: {exc}")
            return "; ".join(problems) or None

        def remote(name: str) -> str | None:
            """A remote model's live state: loaded and checked, and ready on its server."""
            registry = getattr(self, "_model_registry", None)
            if registry is None or registry.backend_of(name) != "kserve" or name in self.model_problems:
                return None
            with self._remote_lock:  # /readyz requests run in threads of their own
                verdict = registry.check(name, live=True)
            if verdict.ok:
                return None
            if not verdict.transient:  # a permanent verdict, as at start
                self.model_problems[name] = verdict.detail
            return verdict.detail

        def models() -> str | None:
            problems = {name: self.model_problems.get(name) or remote(name)
                        for name in sorted({r.model for r in self.config.routes})}
            return "; ".join(f"{k}: {v}" for k, v in problems.items() if v) or None

        def model_check(name: str) -> Callable[[], str | None]:
            return lambda: self.model_problems.get(name) or remote(name)

        def disk() -> str | None:
            # The receiver's own watermark, so readiness and refusals agree.
            watermark = self.receiver.watermark
            if not watermark.below():
                return None
            return f"{watermark.describe()}: new instances are refused until space returns"

        def dicom() -> str | None:
            if not self.receiver.address:
                return "DICOM port not listening"
            # The extra receiver processes start after this one listens.
            waiting = self.listener.not_listening() if self.listener is not None else []
            names = [s.name for s in self._workers if s.role == "receiver" and s.receiver_index in waiting]
            return f"receiver processes not accepting yet: {', '.join(names)}" if names else None

        def workers() -> str | None:
            dead = [s.name for s in self._workers if s.process is None or not s.process.is_alive()]
            return f"not running: {', '.join(dead)}" if dead else None

        def gpu() -> str | None:
            # The sessions the start-up check created, on the providers the
            # workers are given: a model there on the CPU is on the CPU in them.
            registry = getattr(self, "_model_registry", None)
            if registry is None:
                return "models not loaded yet"
            fallen = {name: registry.cpu_fallback(name) for name in sorted({r.model for r in self.config.routes})}
            return "; ".join(f"model {k} {v}" for k, v in fallen.items() if v) or None

        checks = {"store": store, "models": models, "disk": disk, "dicom": dicom, "workers": workers}
        if self.config.inference.require_gpu:
            checks["gpu"] = gpu
        checks.update({f"model {name}": model_check(name) for name in sorted({r.model for r in self.config.routes})})
        return checks
