"""``llmlb serve --workers N``: N balancer replicas on one host, sharing its gRPC and HTTP ports.

One Python process routes on one core; a host with more cores runs several replicas. Each worker is an
ordinary replica of the same PostgreSQL store (see ``balancer.replicas``): its own process, its own node
sessions, nothing shared in memory. The kernel spreads incoming connections over the workers (the ports
are bound with SO_REUSEPORT), so nodes and clients need only the host's one address.

This process is their supervisor: it prepares the store once (migrations, the first admin key, the
fleet token's secret) so the workers do not race for them, starts the workers, starts again one that
exits on its own (after a pause that grows while it keeps failing), and on SIGTERM or SIGINT stops them
all gracefully.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from types import FrameType

import structlog
from sqlalchemy.engine import make_url

from balancer.store.engine import is_postgresql
from common.config import WORKER_ENV, BalancerConfig

log = structlog.get_logger(__name__)

POLL_S = 0.2
RESTART_FIRST_S = 1.0  # pause before starting again a worker that exited on its own
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a worker up this long starts again after the first pause, not a longer one
STOP_GRACE_S = 30.0  # after SIGTERM, how long the workers may take before they are killed


def check_workers(config: BalancerConfig) -> None:
    """Raises ``ValueError`` when ``config`` cannot run several workers."""
    if not is_postgresql(make_url(config.database_url)):
        raise ValueError("--workers (LLMLB_WORKERS) above 1 needs a PostgreSQL store (LLMLB_DATABASE_URL)")
    ports = [config.grpc_listen] + ([config.http_listen] if config.http_listen else [])
    if any(p.rpartition(":")[2] == "0" for p in ports):
        raise ValueError("--workers needs fixed ports: port 0 would give each worker a different one")


class _Worker:
    def __init__(self, index: int, argv: list[str]) -> None:
        self.index = index
        self._argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.pause_s = RESTART_FIRST_S
        self.due = 0.0  # when to start it again after it exited

    def start(self) -> None:
        env = {**os.environ, WORKER_ENV: str(self.index)}
        self.proc = subprocess.Popen([sys.executable, "-m", "balancer.cli", *self._argv], env=env)
        self.started = time.monotonic()
        log.info("worker.started", worker=self.index, pid=self.proc.pid)


def supervise(config: BalancerConfig, argv: list[str]) -> int:
    """Prepares the store, runs ``config.workers`` workers with the same ``argv`` until SIGTERM or
    SIGINT, then stops them; 0 once they all stopped."""
    from balancer.server import prepare_store  # the server's imports only once serving

    check_workers(config)
    asyncio.run(prepare_store(config))
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    workers = [_Worker(i, argv) for i in range(config.workers)]
    for worker in workers:
        worker.start()
    log.info("workers.running", workers=config.workers, grpc=config.grpc_listen, http=config.http_listen)
    while not stopping:
        time.sleep(POLL_S)
        now = time.monotonic()
        for worker in workers:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                up_s = now - worker.started
                worker.pause_s = RESTART_FIRST_S if up_s > HEALTHY_AFTER_S else worker.pause_s
                worker.due = now + worker.pause_s
                log.warning(
                    "worker.exited", worker=worker.index, code=proc.returncode, again_in_s=worker.pause_s
                )
                worker.pause_s = min(RESTART_MAX_S, worker.pause_s * 2)
                worker.proc = None
            elif proc is None and now >= worker.due:
                worker.start()
    log.info("workers.stopping", signal=signal.Signals(stopping[0]).name)
    running = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker.killed", pid=proc.pid)
            proc.kill()
            proc.wait()
    log.info("workers.stopped")
    return 0
