"""``--workers N``: N proxy processes serving one port, supervised by this one.

Each worker is a whole proxy (its own event loop, channels, recorder and health checks)
bound with SO_REUSEPORT, so the kernel spreads connections over them. They share the
backends through the state file: a change made through any worker's admin service is
written there, and every other worker replays it within ``state_poll_interval``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from proxy.errors import ConfigError
from proxy.settings import Settings

log = logging.getLogger(__name__)

# Flags the supervisor sets for each worker itself.
_OWN_FLAGS = {"--workers", "--ready-file", "--listen", "--admin-listen", "--state-file"}
_READY_TIMEOUT_S = 60.0


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _fixed(address: str) -> str:
    """Port 0 means "any free port": pick one now so every worker binds the same."""
    host, _, port = address.rpartition(":")
    return address if port != "0" else f"{host}:{_free_port(host.strip('[]'))}"


def _worker_args(argv: list[str]) -> list[str]:
    """The command line minus the flags the supervisor sets per worker."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OWN_FLAGS:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def supervise(settings: Settings, argv: list[str], ready_file: Path | None) -> int:
    """Run ``settings.workers`` worker processes until SIGTERM/SIGINT; returns the exit code."""
    if settings.state_file is None:
        raise ConfigError("--workers needs a state file (the workers share backends through it)")
    listen = _fixed(settings.listen)
    admin = _fixed(settings.admin_listen) if settings.admin_listen else "off"
    base = [sys.executable, "-m", "proxy", *_worker_args(argv)]
    workdir = Path(tempfile.mkdtemp(prefix="shadow-proxy-workers-"))
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        for index in range(settings.workers):
            ready = workdir / f"worker-{index}.ready"
            command = [
                *base, "--workers", "1", "--reuse-port",
                "--listen", listen, "--admin-listen", admin,
                "--state-file", str(settings.state_file), "--ready-file", str(ready),
            ]  # fmt: skip
            workers.append(subprocess.Popen(command))
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for index, worker in enumerate(workers):
            ready = workdir / f"worker-{index}.ready"
            while not ready.exists():
                if worker.poll() is not None or time.monotonic() > deadline:
                    log.error("worker %d did not start; stopping", index)
                    forward(signal.SIGTERM, None)
                    return _wait(workers) or 1
                time.sleep(0.05)
        log.info("%d workers serving %s (admin %s)", len(workers), listen, admin)
        if ready_file is not None:
            tmp = ready_file.with_name(f".{ready_file.name}.tmp")
            tmp.write_text(f"{listen}\n", encoding="utf-8")
            tmp.replace(ready_file)
        while not stopping:
            for index, worker in enumerate(workers):
                if worker.poll() is not None and not stopping:
                    log.error(
                        "worker %d exited with %s; stopping the others", index, worker.returncode
                    )
                    forward(signal.SIGTERM, None)
                    return _wait(workers) or 1
            time.sleep(0.2)
        return _wait(workers)
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        for path in workdir.iterdir():
            path.unlink(missing_ok=True)
        os.rmdir(workdir)


def _wait(workers: list[subprocess.Popen[bytes]]) -> int:
    code = 0
    for worker in workers:
        try:
            returncode = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            returncode = worker.wait()
        code = code or returncode
    return code
