"""Hostfiles for ``deepspeed --hostfile``: read as DeepSpeed's launcher reads them, with one-line errors.

DeepSpeed's runner (``deepspeed/launcher/runner.py``, ``_parse_hostfile``) strips each line, skips
blank lines and lines starting with ``#``, and needs every other line to start with ``HOST slots=N``
(whatever follows is ignored, so ``node-1 slots=8  # rack 2`` is fine); a host may appear once. Its
errors name neither file nor line, and a missing hostfile silently means "this machine only".
``read_hostfile`` applies the same rules, names the file and line, and also refuses what the
launcher accepts but misreads: ``slots=8x`` (read as 8), ``slots=0`` (a node that starts no rank)
and host names with ``,`` ``:`` or ``@``, which pdsh's host list and ``--include`` use as separators.
"""

from __future__ import annotations

import re
from pathlib import Path

from seemore_ds.config import read_text_file
from seemore_ds.errors import UserError

# DeepSpeed's own pattern, matched at the start of the stripped line.
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
SEPARATORS = ",:@"


def read_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} in file order, the order in which the launcher numbers nodes and ranks."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"hostfile {path} does not exist (deepspeed would silently train on this machine alone); "
                        f"write one line per node such as 'node-1 slots=8'")
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(read_text_file(path, "hostfile").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"hostfile {path}, line {number}"
        match = HOST_LINE.match(line)
        if not match:
            raise UserError(f"{where}: {line!r} is not 'HOST slots=N' (e.g. 'node-1 slots=8'; comments start with #)")
        host, slots = match.group(1), int(match.group(2))
        rest = line[match.end():]
        if rest and not rest[0].isspace():
            raise UserError(f"{where}: slots={match.group(2)}{rest.split()[0]} is not a number of slots "
                            f"(the launcher would read {slots}); write slots={slots}")
        bad = [c for c in SEPARATORS if c in host]
        if bad:
            raise UserError(f"{where}: host name {host!r} contains {bad[0]!r}, which the launcher uses to separate "
                            f"hosts and slots; use the node's plain host name or address")
        if slots == 0:
            raise UserError(f"{where}: {host} has slots=0 and would start no rank; give its number of GPUs "
                            f"(CPU ranks) or delete the line")
        if host in hosts:
            raise UserError(f"{where}: {host} is already listed on line {first_line[host]}; the launcher refuses "
                            f"duplicate hosts: keep one line per node")
        hosts[host], first_line[host] = slots, number
    if not hosts:
        raise UserError(f"hostfile {path} lists no host; write one line per node such as 'node-1 slots=8'")
    return hosts


def describe_hosts(path: str | Path, hosts: dict[str, int]) -> str:
    """One line saying what the launcher will start from this hostfile."""
    nodes = ", ".join(f"node {i}: {host} ({slots} slot{'s' if slots > 1 else ''})"
                      for i, (host, slots) in enumerate(hosts.items()))
    total = sum(hosts.values())
    return f"{path}: {len(hosts)} node(s), {total} rank(s) in all; {nodes}"
