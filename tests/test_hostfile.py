"""Hostfiles are read as DeepSpeed's launcher reads them, and refused with the file and line."""

from __future__ import annotations

import pytest

from conftest import REPO
from seemore_ds.errors import UserError
from seemore_ds.hostfile import read_hostfile

VALID = """\
# two nodes
  worker-1 slots=8   # rack 2

worker-2\tslots=4 max_slots=4
10.0.0.7 slots=1
"""


def deepspeed_parse(text: str) -> dict:
    """DeepSpeed's launcher's own hostfile parser (imported late: importing deepspeed picks its accelerator)."""
    from deepspeed.launcher.runner import _parse_hostfile

    return _parse_hostfile(text.splitlines(keepends=True))


def write(tmp_path, text: str):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_valid_hostfile_reads_as_deepspeed_reads_it(tmp_path):
    hosts = read_hostfile(write(tmp_path, VALID))
    assert hosts == {"worker-1": 8, "worker-2": 4, "10.0.0.7": 1}
    assert list(deepspeed_parse(VALID).items()) == list(hosts.items())  # the order numbers nodes and ranks


# (text, what the message must say, does DeepSpeed's launcher refuse it too?)
REFUSED = [
    ("a slots=2\nb slots=2\na slots=4\n", "line 3: a is already listed on line 1", True),
    ("a slots=2\nb 2\n", "line 2: 'b 2' is not 'HOST slots=N'", True),
    ("a slots=2\nb slots=-1\n", "line 2: 'b slots=-1' is not 'HOST slots=N'", True),
    ("a  slot=2\n", "line 1: 'a  slot=2' is not 'HOST slots=N'", True),
    ("# only a comment\n\n", "lists no host", True),
    ("a slots=2\nb slots=2x\n", "line 2: slots=2x is not a number of slots (the launcher would read 2)", False),
    ("a slots=0\n", "line 1: a has slots=0 and would start no rank", False),
    ("a slots=1\nb,c slots=1\n", "line 2: host name 'b,c' contains ','", False),
    ("node:1 slots=1\n", "line 1: host name 'node:1' contains ':'", False),
]


@pytest.mark.parametrize("text, message, deepspeed_refuses", REFUSED)
def test_bad_hostfile_is_refused_naming_file_and_line(tmp_path, text, message, deepspeed_refuses):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        read_hostfile(path)
    assert str(path) in str(err.value) and message in str(err.value)
    if deepspeed_refuses:
        with pytest.raises(ValueError):
            deepspeed_parse(text)
    else:  # the launcher would take it and misread it: the check is stricter on purpose
        deepspeed_parse(text)


def test_cli_checks_the_shipped_example_and_refuses_a_missing_file(cli, tmp_path):
    result = cli.ok(cli("hostfile", "check", "hostfiles/example", cwd=REPO))
    assert result.stdout.strip() == ("hostfiles/example: 2 node(s), 16 rank(s) in all; "
                                     "node 0: worker-1 (8 slots), node 1: worker-2 (8 slots)")
    cli.user_error(cli("hostfile", "check", "nope", cwd=tmp_path), "hostfile nope does not exist",
                   "silently train on this machine alone")
    write(tmp_path, "a slots=1\na slots=1\n")
    cli.user_error(cli("hostfile", "check", "hostfile", cwd=tmp_path), "hostfile hostfile, line 2: a is already listed")


def test_a_folder_or_non_utf8_bytes_as_hostfile_is_one_line(cli, tmp_path):
    (tmp_path / "binary").write_bytes(b"\xff\xfe\n")
    cli.user_error(cli("hostfile", "check", "binary", cwd=tmp_path), "hostfile binary is not UTF-8 text")
    with pytest.raises(UserError, match="is a folder; name a file"):
        read_hostfile(tmp_path)
