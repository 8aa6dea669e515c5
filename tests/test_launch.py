"""The launch scripts as a user runs them: usage texts, the engine-free CPU run, and the commands the
multi-node and SLURM scripts hand to DeepSpeed's launcher (pdsh and srun replaced by recorders)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_csv_rows

LAUNCH = REPO / "launch"
SCRIPTS = ["multinode.sh", "single_gpu_offload.sh", "cpu_debug.sh", "slurm.sbatch"]
VENV_BIN = str(Path(sys.executable).parent)
TINY = ["model.img_size=32", "model.patch_size=16", "model.image_embed_dim=32", "model.num_blks=1", "model.n_embd=32",
        "model.n_layer=1", "model.n_head=2", "data.synth_n=64", "train.batch_size=8", "log.every=1",
        "log.progress=false", "eval.every=0", "train.precision=fp32"]


def run_script(script: str, *args: str, cwd: Path, env: dict | None = None, timeout_s: int = 300):
    """A launch script in a clean shell environment whose PATH starts with this Python's bin folder."""
    full_env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout_s)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_prints_its_usage(script, tmp_path):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "--external-sources", str(LAUNCH / script)], check=True)
    usage = ok(run_script(script, "-h", cwd=tmp_path)).stdout
    assert usage.startswith("usage: ") and "key=value" in usage
    for variable in ("CONFIG", "OUTPUT_DIR"):
        assert variable in usage
    assert list(tmp_path.iterdir()) == []  # -h starts nothing


def test_cpu_debug_trains_two_steps_without_importing_deepspeed(tmp_path):
    # A deepspeed package that fails on import shadows the real one: the run must never need it.
    shadow = tmp_path / "shadow" / "deepspeed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the engine-free path imported deepspeed')\n")
    result = ok(run_script("cpu_debug.sh", *TINY, "train.max_steps=2", cwd=tmp_path,
                           env={"PYTHONPATH": str(tmp_path / "shadow"), "OUTPUT_DIR": "runs/debug"}))
    assert "backend TorchBackend on cpu x 1" in result.stdout
    assert [row["step"] for row in read_csv_rows(tmp_path / "runs" / "debug" / "losses_log.csv")] == ["1", "2"]


def test_single_gpu_offload_picks_the_offload_config_of_the_stage(tmp_path):
    line = ok(run_script("single_gpu_offload.sh", "train.precision=bf16", cwd=tmp_path,
                         env={"DRY_RUN": "1", "ZERO_STAGE": "3", "GPU": "1"})).stdout
    args = shlex.split(line)
    assert args[:5] == ["deepspeed", "--include", "localhost:1", "--master_port", "29500"]
    assert args[args.index("--deepspeed_config") + 1] == str(REPO / "ds_configs" / "zero3_offload.json")
    assert args[-2:] == ["run.output_dir=runs/single_gpu_offload", "train.precision=bf16"]
    refused = run_script("single_gpu_offload.sh", cwd=tmp_path, env={"DRY_RUN": "1", "ZERO_STAGE": "1"})
    assert refused.returncode == 2 and refused.stderr.startswith("error: ZERO_STAGE must be 2 or 3")


def recorder(folder: Path, name: str) -> Path:
    """An executable ``name`` that appends its arguments (and SLURM_NODEID) to ``name``.jsonl, then exits 0."""
    folder.mkdir(exist_ok=True)
    log = folder / f"{name}.jsonl"
    tool = folder / name
    tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"with open({str(log)!r}, 'a') as f:\n"
                    f"    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    tool.chmod(0o755)
    return log


def test_multinode_hands_pdsh_both_hosts_the_master_and_our_module(tmp_path):
    """DeepSpeed's real runner builds the pdsh command; only pdsh itself is a recorder."""
    (tmp_path / "hostfile").write_text("# two nodes\nnode-a slots=1\nnode-b slots=1\n")
    pdsh_log = recorder(tmp_path / "bin", "pdsh")
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "HOSTFILE": "hostfile", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29777", "DS_ARGS": "--no_ssh_check",
           "OUTPUT_DIR": "runs/two", "DS_ACCELERATOR": "cpu",
           # the shipped example of the variables every node needs (read as .deepspeed_env is)
           "DS_ENV_FILE": str(LAUNCH / "deepspeed_env.example")}
    result = ok(run_script("multinode.sh", "train.max_steps=3", cwd=tmp_path, env=env))
    assert "hostfile: 2 node(s), 2 rank(s) in all" in result.stderr
    (pdsh,) = [json.loads(line) for line in pdsh_log.read_text().splitlines()]
    assert pdsh[:5] == ["-S", "-f", "1024", "-w", "node-a,node-b"]
    remote = " ".join(pdsh[5:])  # what pdsh runs on every node
    assert f"cd {tmp_path};" in remote and "-m deepspeed.launcher.launch" in remote
    for fragment in ("--node_rank=%n", "--master_addr=10.1.2.3", "--master_port=29777", " --module ",
                     f" seemore_ds train --deepspeed_config {REPO / 'ds_configs' / 'zero2.json'} "
                     "run.output_dir=runs/two train.max_steps=3", f"export PYTHONPATH={tmp_path}:{REPO};"):
        assert fragment in remote, (fragment, remote)
    for line in (LAUNCH / "deepspeed_env.example").read_text().splitlines():
        assert f"export {line};" in remote, (line, remote)


def test_multinode_refuses_to_start_without_a_valid_hostfile(tmp_path):
    result = run_script("multinode.sh", cwd=tmp_path, env={"DRY_RUN": "1", "HOSTFILE": ""})
    assert result.returncode == 2 and result.stderr.startswith("error: set HOSTFILE")
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-a slots=1\n")
    result = run_script("multinode.sh", cwd=tmp_path, env={"DRY_RUN": "1", "HOSTFILE": "hostfile"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("error: hostfile hostfile, line 2: node-a is already listed on line 1; "
                                     "the launcher refuses duplicate hosts: keep one line per node")


def fake_slurm(tmp_path: Path) -> dict:
    """scontrol and srun stand in for SLURM; srun runs its task once per "node", where multinode.sh
    prints its command (DRY_RUN=1 for that task alone)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    # srun --ntasks-per-node=1 --kill-on-bad-exit=1 ...: run the task on each node, as SLURM would.
    (bin_dir / "srun").write_text('#!/bin/sh\nshift 2\nfor node in 0 1; do DRY_RUN=1 SLURM_NODEID=$node "$@" || exit 1; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "4"}


def test_slurm_job_starts_one_launcher_per_node_without_ssh(tmp_path):
    result = ok(run_script("slurm.sbatch", "train.max_steps=9", cwd=tmp_path, env=fake_slurm(tmp_path)))
    hostfile = tmp_path / "runs" / "slurm-77" / "hostfile"
    assert hostfile.read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    for node_rank, args in enumerate(lines):
        assert args[args.index("--node_rank") + 1] == str(node_rank) and "--no_ssh" in args
        assert args[args.index("--master_addr") + 1] == "gpu-a"
        assert args[args.index("--hostfile") + 1] == "runs/slurm-77/hostfile"
        assert args[-2:] == ["run.output_dir=runs/slurm-77", "train.max_steps=9"]


def test_slurm_dry_run_prints_the_job_and_writes_nothing(tmp_path):
    env = {**fake_slurm(tmp_path), "DRY_RUN": "1"}
    result = ok(run_script("slurm.sbatch", "train.max_steps=9", cwd=tmp_path, env=env))
    comments = [line for line in result.stdout.splitlines() if line.startswith("#")]
    assert comments == ["# runs/slurm-77/hostfile would hold:", "#   gpu-a slots=4", "#   gpu-b slots=4"]
    (command,) = [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]
    assert command[0] == "srun" and command[-2:] == [str(REPO), "train.max_steps=9"]
    assert not (tmp_path / "runs").exists()


def test_slurm_outside_a_job_says_so_and_writes_nothing(tmp_path):
    env = {"SLURM_JOB_NODELIST": "", "SLURM_JOB_ID": "", "REPO": str(REPO)}
    result = run_script("slurm.sbatch", cwd=tmp_path, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: not inside a SLURM job") and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
