"""Start a test module as several gloo ranks here, as torchrun would, and wait for them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_ranks(
    module: str, out: Path, *, cwd: Path, world: int = 2, timeout: float = TIMEOUT_S
) -> None:
    """``python -m module OUT`` once per rank with torchrun's variables; fails on a hang or error.

    Each rank's output goes to ``OUT/log<rank>.txt``; a rank still running after ``timeout``
    seconds is killed and the test fails, quoting the end of every log.
    """
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            WORLD_SIZE=str(world),
            RANK=str(rank),
            NODE_RANK="0",
            LOCAL_RANK=str(rank),
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )
        log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(out)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append((proc, log))
    deadline = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p, _ in procs if p.poll() is None]
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((out / f"log{r}.txt").read_text()[-3000:] for r in range(world))
    assert not hung, f"a rank hung (killed after {timeout} s):\n{logs}"
    assert all(p.returncode == 0 for p, _ in procs), logs
