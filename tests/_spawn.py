"""Multi-process tests' ranks, started with a deadline so that a hung collective fails the
test instead of hanging the suite (torch 2.13's gloo deadlocks now and then at teardown, and
a fault that makes ranks disagree can leave one waiting in a collective for ever)."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp

DEADLINE_S = 180.0  # the slowest module's ranks take ~20 s on the 2-core CI machine


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, args: tuple, nprocs: int, deadline_s: float = DEADLINE_S) -> None:
    """``mp.spawn(fn, args, nprocs)``, joined; a rank's exception is raised as by ``mp.spawn``.
    Ranks still running after ``deadline_s`` are killed and the test fails, saying so."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.0, end - time.monotonic())):
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{nprocs} ranks still running after {deadline_s:.0f} s (a collective "
                        "hung); killed")  # fmt: skip
