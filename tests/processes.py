"""Start processes the way ``torchrun`` does, for the data-parallel tests."""

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pyro_bmr import compiled_elbo

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: Sequence[str], world_size: int = 2, cwd: Path = ROOT
) -> list[subprocess.CompletedProcess]:
    """Run ``python *args`` as ``world_size`` ranks of one process group (gloo, on
    this machine), with torchrun's environment; wait for all of them."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        )
        env.setdefault(compiled_elbo.ENV_VAR, "fx")  # as the tests' conftest sets it
        procs.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done
