"""Two nodes on one machine, for real: launch/multinode.sh run twice with NODE_RANK=0 and 1, i.e. two
``deepspeed --hostfile H --no_ssh --node_rank N --master_addr A --master_port P`` launches of one CPU
rank each (ZeRO-2, gloo), training into one run folder, saving and resuming with train.resume=auto.

As root with ``ip netns``, each node runs in a network namespace of its own, the two joined by a veth
pair with their own addresses (10.213.0.1 and .2): the ranks meet over a link, as two machines would,
and the loopback of one is not the other's. With checkpoint.use_node_local_storage=true each node also
gets a mount namespace in which RUN/checkpoints is its own "disk" folder, so the nodes share no
checkpoint storage. Without root the nodes share this machine's network and the node-local run is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, read_csv_rows
from seemore_ds.backends.ds_config import resolve_ds_config
from seemore_ds.config import load_config
from seemore_ds.errors import UserError
from seemore_ds.launching import free_port

VENV_BIN = str(Path(sys.executable).parent)
TINY = ["model.img_size=32", "model.patch_size=16", "model.image_embed_dim=32", "model.num_blks=1", "model.n_embd=32",
        "model.n_layer=1", "model.n_head=2", "data.synth_n=64", "train.batch_size=8", "log.every=1",
        "log.progress=false", "eval.every=2", "checkpoint.every=2", "train.precision=fp32"]
HOSTFILE = "# two nodes on one machine\nnode-a slots=1\nnode-b slots=1\n"
SUBNET = "10.213.0"  # exists only inside the test's namespaces
LAUNCH_TIMEOUT_S = 600  # a fresh machine first JIT-builds deepspeed_shm_comm (minutes on 2 cores)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _can_isolate() -> bool:
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("unshare")):
        return False
    probe = f"seemore-probe-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return True


class TwoNodes:
    """Where the two nodes run: their own network (and, on request, storage) namespaces, or this host."""

    def __init__(self):
        self.isolated = _can_isolate()
        tag = os.getpid()
        self.netns = [f"seemore-{tag}-{node}" for node in range(2)]
        self.links = [f"sm{tag}{'ab'[node]}" for node in range(2)]  # interface names: at most 15 characters
        self.master_addr = f"{SUBNET}.1" if self.isolated else "127.0.0.1"

    def __enter__(self):
        if self.isolated:
            for netns in self.netns:
                ip("netns", "add", netns)
            ip("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])
            for node, (netns, link) in enumerate(zip(self.netns, self.links)):
                ip("link", "set", link, "netns", netns)
                ip("-n", netns, "addr", "add", f"{SUBNET}.{node + 1}/24", "dev", link)
                ip("-n", netns, "link", "set", link, "up")
                ip("-n", netns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc):
        for netns in self.netns if self.isolated else ():
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)  # takes its end of the veth pair along

    def command(self, node: int, argv: list[str], own_checkpoints: tuple[Path, Path] | None = None) -> list[str]:
        """``argv`` as run on ``node``; ``own_checkpoints=(disk, target)`` mounts the node's disk folder on target."""
        if not self.isolated:
            return argv
        if own_checkpoints:
            disk, target = own_checkpoints
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount --bind "$0" "$1" && shift && exec "$@"', str(disk), str(target), *argv]
        return ["ip", "netns", "exec", self.netns[node], *argv]

    def launch(self, work: Path, name: str, overrides: list[str], node_disks: list[Path] | None = None,
               node_env: list[dict] | None = None) -> list[str]:
        """Both nodes' ``launch/multinode.sh`` at once (``node_env``: each node's own additions to the
        environment); their console output, node 0 first. Never hangs."""
        (work / "hostfile").write_text(HOSTFILE)
        port = "29500" if self.isolated else str(free_port())  # each namespace pair is a fresh network
        procs, logs = [], []
        for node in range(2):
            env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
                   "OMP_NUM_THREADS": "1", "HOSTFILE": "hostfile", "NODE_RANK": str(node),
                   "MASTER_ADDR": self.master_addr, "MASTER_PORT": port, "DS_CONFIG": str(REPO / "ds_configs" / "zero2.json"),
                   "OUTPUT_DIR": str(work / name), "DS_ARGS": "--log_level warning", **(node_env[node] if node_env else {})}
            if self.isolated:  # gloo would look for this machine's host name, which the namespace lacks
                env["GLOO_SOCKET_IFNAME"] = self.links[node]
            own = (node_disks[node], work / name / "checkpoints") if node_disks else None
            argv = self.command(node, ["bash", str(REPO / "launch" / "multinode.sh"), *overrides], own)
            logs.append(work / f"{name}-node{node}.log")
            with open(logs[-1], "w") as log:  # files, not pipes: a full pipe would stall one node mid-collective
                procs.append(subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        # A node that fails does not end the other, which would wait for it: stop at the first failure.
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                codes = [proc.poll() for proc in procs]
                if codes == [0, 0] or any(code not in (None, 0) for code in codes):
                    break
                time.sleep(0.5)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
        codes = [proc.wait() for proc in procs]
        outputs = [log.read_text() for log in logs]
        assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(f"--- node {i}\n{out[-3000:]}" for i, out in enumerate(outputs))
        return outputs


@pytest.fixture(scope="module")
def two_nodes():
    """Every two-node launch of this module, run once: (folder, outputs by launch name, isolated?)."""
    # Not under pytest's basetemp: a concurrent pytest session may prune it while these launches run.
    work = Path(tempfile.mkdtemp(prefix="seemore-ds-nodes-"))
    try:
        with TwoNodes() as nodes:
            outputs = {
                # one run folder on storage both nodes see: 2 steps, then resumed to 4
                "shared_half": nodes.launch(work, "shared", [*TINY, "train.max_steps=2"]),
                "shared_resume": nodes.launch(work, "shared", [*TINY, "train.max_steps=4", "train.resume=auto"]),
            }
            if nodes.isolated:  # 4 steps straight with a disk per node, then resumed from those disks to 6
                disks = [work / f"disk-node{node}" for node in range(2)]
                for folder in (*disks, work / "local" / "checkpoints"):
                    folder.mkdir(parents=True)
                local = [*TINY, "checkpoint.use_node_local_storage=true"]
                outputs["local"] = nodes.launch(work, "local", [*local, "train.max_steps=4"], disks)
                outputs["local_resume"] = nodes.launch(work, "local", [*local, "train.max_steps=6", "train.resume=auto"], disks)
            else:
                outputs["local"] = nodes.launch(work, "local", [*TINY, "train.max_steps=4"])
            yield work, outputs, nodes.isolated
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_two_nodes_train_save_and_resume_in_one_run_folder(two_nodes):
    work, outputs, isolated = two_nodes
    node0, node1 = outputs["shared_half"]
    assert "backend DeepSpeedBackend on cpu x 2" in node0  # one world of two ranks, one per node
    assert "data:" not in node1  # rank 0 alone talks
    run = work / "shared"
    assert f"resuming from {run / 'checkpoints' / 'step_000002'} at step 2" in outputs["shared_resume"][0]
    checkpoint = {p.name for p in (run / "checkpoints" / "step_000004").iterdir()}
    assert {"train_state.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"} <= checkpoint
    assert sorted(p.name for p in (run / "checkpoints" / "step_000004" / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    # The resumed run continues exactly where a run of 4 steps straight is (steps, losses, lr); where
    # that run kept its checkpoints does not change its numbers.
    resumed, straight = read_csv_rows(run / "losses_log.csv"), read_csv_rows(work / "local" / "losses_log.csv")[:4]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == ["1", "2", "3", "4"]
    for a, b in zip(resumed, straight):
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 1e-5, (a, b)
        assert a["lr"] == b["lr"]
    assert abs(float(resumed[-1]["val_loss"]) - float(straight[-1]["val_loss"])) <= 1e-5


def test_each_node_keeps_and_resumes_from_its_own_checkpoint_disk(two_nodes, cli):
    work, outputs, isolated = two_nodes
    if not isolated:
        pytest.skip("needs root and ip netns for a storage namespace per node")
    run = work / "local"
    assert list((run / "checkpoints").iterdir()) == []  # nothing reached the shared folder
    for node in range(2):
        disk = work / f"disk-node{node}"
        other = 1 - node
        assert (disk / "latest").read_text().strip() == "step_000006"
        files = {p.name for p in (disk / "step_000004").iterdir()}
        # the node's first rank lays the folder out (model states, config, tokenizer) on its own disk
        assert {"train_state.json", f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt", "config.yaml", "tokenizer.json"} <= files
        assert [p.name for p in (disk / "step_000004" / "rng").iterdir()] == [f"rank{node}.pt"]
        assert f"zero_pp_rank_{other}_mp_rank_00_optim_states.pt" not in files
    assert f"resuming from {run / 'checkpoints' / 'step_000004'} at step 4" in outputs["local_resume"][0]
    rows = read_csv_rows(run / "losses_log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    # Gathered into one folder (the files both nodes wrote are the same), the checkpoint exports as any other.
    gathered = work / "gathered"
    shutil.copytree(work / "disk-node0" / "step_000006", gathered)
    for file in (work / "disk-node1" / "step_000006").iterdir():
        if not (gathered / file.name).exists():
            shutil.copy2(file, gathered / file.name)
    cli.ok(cli("export", "--checkpoint", gathered, "--out", work / "export", cwd=work))
    result = json.loads(cli.ok(cli("eval", "--checkpoint", work / "export", "--json", cwd=work)).stdout)
    assert abs(result["val_loss"] - float(rows[-1]["val_loss"])) <= 1e-5, (result, rows[-1])


def test_node_local_storage_reaches_the_deepspeed_json_and_a_contradiction_is_refused():
    cfg = load_config(None, ["checkpoint.use_node_local_storage=true"])
    assert resolve_ds_config({}, cfg, world_size=2)[0]["checkpoint"]["use_node_local_storage"] is True
    auto = {"checkpoint": {"use_node_local_storage": "auto"}}
    assert resolve_ds_config(auto, load_config(), world_size=2)[0]["checkpoint"]["use_node_local_storage"] is False
    # The JSON's own value governs a YAML left at its default, and the run says so.
    adopting = load_config()
    _, adopted = resolve_ds_config({"checkpoint": {"use_node_local_storage": True}}, adopting, 2, source="x.json")
    assert adopting.checkpoint.use_node_local_storage is True
    assert adopted == ["checkpoint.use_node_local_storage=true from x.json checkpoint.use_node_local_storage"]
    with pytest.raises(UserError, match=r"x\.json: checkpoint\.use_node_local_storage=true contradicts "
                                        r"checkpoint\.use_node_local_storage=false"):
        resolve_ds_config({"checkpoint": {"use_node_local_storage": True}},
                          load_config(None, ["checkpoint.use_node_local_storage=false"]), 2, source="x.json")
