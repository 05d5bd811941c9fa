"""The main process with `server.workers` > 1: everything but serving calls.

It loads the configuration, opens the store, the signing keys and the first generation,
owns the admin socket, metrics, systemd notification, reloads and shutdown, exactly as a
lone daemon does (it is one: `Supervisor` is a `Daemon` that serves no gRPC), and runs N
worker processes (workers/worker.py) that each bind `server.listen` with SO_REUSEPORT,
so the kernel spreads connections over them. The port is reserved here first (a bound,
never listening socket with SO_REUSEPORT, held for the process's life), so `port 0`
resolves once and a restarted worker binds the same port.

What stays exact across workers is decided here, on one event loop, as on one node:
every call with a limit or a budget is admitted here in one round trip (admission.py:
rpm, budgets, concurrency, with the Limiter or, on PostgreSQL, the cluster limiter; is
the client still active), every served call's usage is recorded here (and written by
its worker to a file of its own first: journal_files.py), and a client or key change is
pushed to every worker and acknowledged before the admin operation answers, each worker
cancelling the calls it must (so a call with nothing to decide here is admitted by its
worker alone, from its up-to-date copy). A worker that dies gives back its slots at
once (its leases are here) and is started again; its clients saw their connection drop
(UNAVAILABLE, retryable).
READY=1 goes out when every worker serves; WATCHDOG=1 while every worker answered a ping
(which checks its own gRPC server) within the interval. A reload is all or none: every
worker builds the new generation first, and only if all could do all swap. Shutdown
drains every worker, each within the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import structlog

from vibectl.util.hostport import join_host_port
from vibectl.util.timefmt import iso
from vibectld.config import DaemonConfig
from vibectld.daemon import Daemon
from vibectld.generation import GenerationRejected
from vibectld.ops.watchdog import Probe
from vibectld.runtime import Runtime
from vibectld.service.staleness import StorageState
from vibectld.startup import StartupError
from vibectld.store.journal import UsageJournal
from vibectld.store.records import ClientRecord
from vibectld.workers.admission import MainAdmission
from vibectld.workers.channel import Channel, ChannelClosed, Failed
from vibectld.workers.journal_files import journal_of, record_usage, tagged
from vibectld.workers.pushes import Pushes
from vibectld.workers.slots import WorkersInFlight, WorkerSlot
from vibectld.workers.view import ca_to_wire, keys_to_wire

log = structlog.get_logger("vibectld.workers")

# How long every worker has to start serving before the daemon gives up starting.
START_TIMEOUT_SECONDS = 60.0
# How often each worker is pinged (the watchdog's proof and the status rows).
PING_SECONDS = 0.5
# A worker that keeps dying is restarted after a growing pause, at most this.
MAX_RESTART_PAUSE_SECONDS = 5.0
# Past the shutdown grace, how long a worker may take to exit before SIGKILL.
EXIT_MARGIN_SECONDS = 5.0
# How long a dead worker's channel may take to be read to its end (its last records).
DRAIN_CHANNEL_SECONDS = 5.0


class Supervisor(Daemon):
    def __init__(self, config: DaemonConfig, count: int) -> None:
        super().__init__(config)
        self.count = count
        self.slots = [WorkerSlot(i + 1) for i in range(count)]
        self._pushes = Pushes(self.slots)
        self._reserved: socket.socket | None = None
        self._listen = config.server.listen
        self._stopping = False
        self._all_or_none = asyncio.Lock()
        self._watchers: list[asyncio.Task[None]] = []
        self._started = False
        self._start_failure: asyncio.Future[str] | None = None
        self._journal: UsageJournal | None = None

    # -- start ------------------------------------------------------------------------

    def _open_state(self) -> Runtime:
        rt = super()._open_state()
        self._pushes.loop = asyncio.get_running_loop()
        rt.workers = self
        rt.inflight = self._pushes.inflight = WorkersInFlight(self.in_flight_by_client)
        self._admission = MainAdmission(rt)
        self._journal = journal_of(rt.registry)
        self._pushes.wrap_writers(rt)
        return rt

    async def _start_grpc(self, rt: Runtime) -> None:
        """Reserve the port, start every worker, return once each serves."""
        host, port = self._reserve_port()
        self._listen = join_host_port(host, port)
        rt.grpc_host, rt.grpc_port = self.config.server.listen.rpartition(":")[0], port
        failure = self._start_failure = asyncio.get_running_loop().create_future()
        for slot in self.slots:
            await self._spawn(slot)
        all_serving = asyncio.ensure_future(
            asyncio.gather(*(slot.serving.wait() for slot in self.slots))
        )
        await asyncio.wait(
            [all_serving, failure],
            timeout=START_TIMEOUT_SECONDS,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not all_serving.done():
            all_serving.cancel()
            why = (
                failure.result()
                if failure.done()
                else f"not every worker served within {START_TIMEOUT_SECONDS:g} s"
            )
            self._stopping = True
            for slot in self.slots:
                if slot.proc is not None and slot.proc.returncode is None:
                    slot.proc.kill()
            raise StartupError(f"{why}; see the log above for the cause")
        self._started = True
        self._tasks.append(asyncio.create_task(self._ping_loop(), name="worker-pings"))
        log.info("workers.serving", workers=self.count, pids=[s.pid for s in self.slots])

    def _reserve_port(self) -> tuple[str, int]:
        listen = self.config.server.listen
        host, _, port_text = listen.rpartition(":")
        bare = host.strip("[]")
        busy = f"cannot listen on {listen}; is another process using the port? "
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                bare or None, int(port_text), type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as e:
            raise StartupError(
                f"{busy}change server.listen or stop it ({e.strerror or e})"
            ) from None
        self._reserved = sock
        return host, int(sock.getsockname()[1])

    async def _spawn(self, slot: WorkerSlot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The same command this process was started with (the same interpreter, options,
        # module or script, and --config), as a worker: a fresh interpreter, not a fork.
        argv = [sys.executable, *sys.orig_argv[1:], "--worker-fd", str(child.fileno())]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        slot.serving = asyncio.Event()
        slot.state = "starting"
        slot.journalled = slot.acknowledged = 0  # a new process numbers from 1
        slot.token = None
        slot.channel = Channel(
            parent,
            lambda kind, body: self._handle(slot, kind, body),
            lambda kind, body: self._told(slot, kind, body),
        )
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            child.close()
        slot.started_at = time.time()
        await slot.channel.start()
        watcher = asyncio.create_task(self._watch(slot, slot.proc), name=f"worker-{slot.index}")
        self._watchers.append(watcher)
        watcher.add_done_callback(self._watchers.remove)

    async def _watch(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        """Wait for the worker to exit; give back its slots; start another unless stopping."""
        code = await proc.wait()
        if slot.channel is not None:
            # Every record it sent is read and journalled before its files go.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_CHANNEL_SECONDS):
                    await slot.channel.closed.wait()
            drained = slot.channel.closed.is_set()
            await slot.channel.close()
            if drained:
                self._forget_files(slot)
        released = self._admission.release_worker(slot.index)
        slot.state = "stopped"
        slot.per_client = Counter()
        if self._stopping:
            return
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        log.error(
            "worker.died",
            worker=slot.index,
            pid=proc.pid,
            how=how,
            released_calls=released,
            hint="its clients' calls failed with UNAVAILABLE; starting another",
        )
        if not self._started:
            # Dead before the daemon was ready: the start fails, naming why (the log).
            assert self._start_failure is not None
            if not self._start_failure.done():
                self._start_failure.set_result(f"worker {slot.index} exited ({how}) before serving")
            return
        slot.restarts += 1
        slot.state = "restarting"
        await asyncio.sleep(min(0.2 * slot.restarts, MAX_RESTART_PAUSE_SECONDS))
        if not self._stopping:
            await self._spawn(slot)

    # -- the channel ------------------------------------------------------------------

    async def _handle(self, slot: WorkerSlot, kind: str, body: Any) -> Any:
        rt = self.runtime
        assert rt is not None
        if kind == "admit":
            asking = slot.proc  # it may die while the cluster limiter answers

            def still_serving() -> bool:
                return asking is not None and slot.proc is asking and asking.returncode is None

            return await self._admission.admit(slot.index, still_serving, *body)
        if kind == "spent":
            return rt.registry.usd_spent_month(body, time.time())
        if kind == "hello":
            _, slot.token = body
            return self._hello(slot, rt)
        if kind == "serving":
            slot.state = "serving"
            slot.last_pong = time.monotonic()
            slot.generation = rt.generation.number
            slot.serving.set()
            return None
        raise ValueError(f"unknown message {kind!r}")

    def _told(self, slot: WorkerSlot, kind: str, body: Any) -> None:
        """What a worker sends without waiting: slots given back, usage, metrics."""
        rt = self.runtime
        assert rt is not None
        if kind == "release":
            self._admission.release(body)
        elif kind == "record_call" or kind == "record_redactions":
            tag, *fields = body
            with tagged(self._journal, tag):
                record_usage(rt.registry, kind, fields)
            if tag:
                slot.journalled = tag[1]
        elif kind == "observe_call":
            rt.metrics.observe_call(*body)
        elif kind == "observe_redactions":
            found, action = body
            rt.metrics.observe_redactions(found, action)
        elif kind == "refusals":
            for reason, n in body.items():
                rt.metrics.refusals.labels(reason).inc(n)
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _acknowledge(self, slot: WorkerSlot) -> None:
        """Tell a worker which of its records are journalled here, so it deletes the files
        that hold only those; with each ping (no call waits for it: journal_files.py)."""
        channel = slot.channel
        if slot.journalled > slot.acknowledged and channel is not None:
            slot.acknowledged = slot.journalled
            with contextlib.suppress(ChannelClosed):
                channel.tell("journalled", slot.journalled)

    def _forget_files(self, slot: WorkerSlot) -> None:
        """A dead worker's channel is read to its end: each record it told is journalled
        here, so a line beyond them in its files is a call that never answered."""
        journal, token = self._journal, slot.token
        if journal is not None and token is not None and not journal.forget_worker(token):
            log.warning(
                "worker.usage_files_left",
                worker=slot.index,
                hint="check permissions in the usage journal's workers directory",
            )

    def _hello(self, slot: WorkerSlot, rt: Runtime) -> dict[str, Any]:
        return {
            "index": slot.index,
            "workers": self.count,
            "config": rt.generation.config,
            "listen": self._listen,
            "records": rt.registry.clients(include_inactive=True),
            "keys": keys_to_wire(rt.signing.loaded()),
            "generation": rt.generation.number,
            "ca": ca_to_wire(rt.generation.ca),
        }

    def _changed(self, record: ClientRecord) -> None:
        super()._changed(record)
        assert self.runtime is not None
        self.runtime.background(self._pushes.push("client", record))

    # -- watchdog, status -------------------------------------------------------------

    async def _ping_loop(self) -> None:
        assert self.runtime is not None
        gauge = self.runtime.metrics.in_flight
        while True:
            await asyncio.gather(*(self._ping(slot) for slot in self.slots))
            gauge.set(sum(slot.per_client.total() for slot in self.slots))
            await asyncio.sleep(PING_SECONDS)

    async def _ping(self, slot: WorkerSlot) -> None:
        channel = slot.channel
        if channel is None or slot.state != "serving":
            return
        self._acknowledge(slot)  # sent ahead of the ping, in the same write
        try:
            answer = await channel.ask("ping", within=PING_SECONDS)
        except (ChannelClosed, Failed, TimeoutError):
            return
        if answer["serving"]:
            slot.last_pong = time.monotonic()
        slot.generation = answer["generation"]
        slot.per_client = Counter(answer["per_client"])

    def _serving_proof(self) -> Probe:
        async def every_worker_answered(seconds: float) -> bool:
            now = time.monotonic()
            late = [
                s.index
                for s in self.slots
                if s.state != "serving" or now - s.last_pong > max(seconds, 2 * PING_SECONDS)
            ]
            if late:
                log.warning("watchdog.workers_silent", workers=late)
            return not late

        return every_worker_answered

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "index": s.index,
                "pid": s.pid,
                "state": s.state,
                "started": iso(int(s.started_at)) if s.started_at else None,
                "restarts": s.restarts,
                "in_flight": s.per_client.total(),
                "generation": s.generation,
            }
            for s in self.slots
        ]

    def in_flight_by_client(self) -> Counter[str]:
        """As the workers' last pings said (at most PING_SECONDS old)."""
        total: Counter[str] = Counter()
        for slot in self.slots:
            total.update(slot.per_client)
        return total

    def _status_line(self) -> str:
        line = super()._status_line()
        serving = sum(1 for s in self.slots if s.state == "serving")
        return f"{line}; {serving} of {self.count} workers serving"

    async def _set_health(self, state: StorageState) -> None:
        pass  # the workers run the health service; the call gate's checks are here

    # -- reload -----------------------------------------------------------------------

    async def reload(self) -> list[str]:
        """Every worker builds the new generation, then this process does; only if all
        could do all swap; else none does and the first reason is raised."""
        async with self._all_or_none:
            live = [s for s in self.slots if s.channel is not None and s.state == "serving"]
            reason = await self._ask_all(live, "prepare")
            if reason is None:
                try:
                    notes = await super().reload()
                except GenerationRejected:
                    await self._ask_all(live, "abandon")
                    raise
                await self._ask_all(live, "swap")
                return notes
            await self._ask_all(live, "abandon")
            self._last_reload_error = reason
            log.error(
                "reload.rejected", error=reason, hint="the previous configuration keeps serving"
            )
            self.notifier.ready(self._status_line())
            raise GenerationRejected(reason)

    async def _ask_all(self, slots: list[WorkerSlot], kind: str) -> str | None:
        async def one(slot: WorkerSlot) -> str | None:
            assert slot.channel is not None
            try:
                await slot.channel.ask(kind, within=60)
            except (Failed, ChannelClosed, TimeoutError) as e:
                return f"worker {slot.index}: {e or 'did not answer'}"
            return None

        reasons = [r for r in await asyncio.gather(*(one(s) for s in slots)) if r]
        return reasons[0] if reasons else None

    # -- stop -------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Drain every worker (each refuses new calls and lets running ones finish within
        the grace), wait for them to exit (SIGKILL past the grace), then stop the rest."""
        grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        self._stopping = True
        self.notifier.stopping()
        for slot in self.slots:
            slot.state = "draining" if slot.state == "serving" else slot.state
            if slot.channel is not None and not slot.channel.closed.is_set():
                with contextlib.suppress(ChannelClosed):
                    slot.channel.tell("drain")
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        if procs:
            waits = asyncio.gather(*(p.wait() for p in procs))
            try:
                async with asyncio.timeout(grace + EXIT_MARGIN_SECONDS):
                    await waits
            except TimeoutError:
                for proc in procs:
                    if proc.returncode is None:
                        log.error("worker.killed", pid=proc.pid, hint="it ignored the drain")
                        with contextlib.suppress(ProcessLookupError):
                            proc.send_signal(signal.SIGKILL)
                await asyncio.gather(*(p.wait() for p in procs))
        if self._watchers:
            # Each reads its worker's last records and deletes its files (a watcher in
            # a restart pause is done with both).
            await asyncio.wait(list(self._watchers), timeout=DRAIN_CHANNEL_SECONDS)
        for watcher in list(self._watchers):
            watcher.cancel()
        await super().stop(grace)
        if self._reserved is not None:
            self._reserved.close()
