"""A rank's process from start to end: whether a launcher started it, its arguments, a rendezvous, its exit.

A launcher (``deepspeed``, torchrun) starts one process per rank with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, and ``deepspeed`` adds ``--local_rank=N`` to the arguments. A run
that no launcher started gets the same variables from ``stand_in_for_launcher`` (DeepSpeed needs
them), and this module remembers which values those were, so that they never read as a launcher's.
``end_process`` ends a process that took part in collectives without the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
from typing import NoReturn

# The variables stand_in_for_launcher wrote in this process, with the values it wrote.
_written_without_launcher: dict[str, str] = {}


def launched_by_deepspeed() -> bool:
    """True when a launcher started this process: it sets LOCAL_RANK and WORLD_SIZE for every rank.

    The values ``stand_in_for_launcher`` wrote earlier in this process do not count."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    ours = _written_without_launcher
    return not ours or any(os.environ.get(name) != value for name, value in ours.items())


def stand_in_for_launcher() -> None:
    """Give a process no launcher started the variables of a one-rank world, as a launcher would.

    DeepSpeed's ``init_distributed`` looks for MPI without them, and its ZeRO-3 code reads LOCAL_RANK.
    A MASTER_ADDR or MASTER_PORT already set is kept."""
    if "WORLD_SIZE" in os.environ:  # a launcher's, or ours from an earlier run in this process
        return
    values = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
              "MASTER_ADDR": os.environ.get("MASTER_ADDR") or "127.0.0.1",
              "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port())}
    os.environ.update(values)
    _written_without_launcher.update(values)


def free_port() -> int:
    """A TCP port no process listens on now, for a rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_arguments() -> list[str]:
    """This process's arguments without the ``--local_rank=N`` the deepspeed launcher adds."""
    return [a for a in sys.argv[1:] if not a.startswith("--local_rank")]


def train_arguments() -> list[str]:
    """This run's command-line arguments from ``train`` on, for a message that says what to run."""
    args = script_arguments()
    return args if args[:1] == ["train"] else ["train", "..."]


def end_process(code: int) -> NoReturn:
    """End this process with exit code ``code``; one that holds a process group skips Python's finalization.

    A collective's worker thread (gloo's) may still be letting go of the last collective's tensors when the main
    thread exits. Where that frees a tensor's Python object, the thread takes the GIL, and once Python has begun
    finalizing, Python up to 3.13 ends such a thread in the middle of a C++ destructor: the process aborts ("terminate
    called without an active exception", exit -6) after a run that succeeded (pytorch/pytorch#190489). Destroying
    the group does not stop those threads while DeepSpeed's engine still holds it, which it does until the process
    ends. So such a process runs every exit handler, flushes its output and ends at once, as a forked
    multiprocessing child does.
    """
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not (distributed.is_available() and distributed.is_initialized()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs, ours included (deepspeed_backend destroys the group there)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
