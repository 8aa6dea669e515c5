"""train.precision=auto: the rules given the facts, the cache of measured steps, and real runs that use the
pick on the engine-free backend and on two DeepSpeed ranks (two nodes, each with a cache of its own)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from seemore_ds import precision
from seemore_ds.backends.deepspeed_compat import op_build_root
from seemore_ds.config import ModelConfig
from seemore_ds.model import SeemoreVLM
from seemore_ds.precision import Choice, cpu_auto_choice, cpu_choice, gpu_choice
from test_multinode import TINY as NODE_TINY
from test_multinode import TwoNodes

OTHER = {"fp32": "bf16", "bf16": "fp32"}


def test_cpu_rule_prefers_fp32_unless_bf16_is_clearly_faster():
    assert cpu_choice(1.0, 0.5) == Choice("bf16", "measured: bf16 step 2.00x faster on this CPU")
    assert cpu_choice(1.05, 1.0).precision == "bf16"  # exactly the margin
    near_tie = cpu_choice(1.03, 1.0)
    assert near_tie.precision == "fp32" and "only 1.03x faster" in near_tie.reason
    slower = cpu_choice(1.0, 1.24, cached="/c/precision_auto.json")
    assert slower.line() == "precision: auto -> fp32 (cached: bf16 step 1.24x slower on this CPU; /c/precision_auto.json)"


def test_gpu_rule_bf16_where_supported_else_fp16_within_what_the_json_leaves_open():
    assert gpu_choice("NVIDIA H200", True) == Choice("bf16", "NVIDIA H200 supports bf16")
    assert gpu_choice("Tesla V100", False).precision == "fp16"
    assert "loss scaling" in gpu_choice("Tesla V100", False).reason
    assert gpu_choice("NVIDIA H200", True, ("fp32", "fp16")).precision == "fp16"  # the JSON turned bf16 off
    assert gpu_choice("NVIDIA H200", True, ("fp32",)).precision == "fp32"


def test_a_decisive_round_ends_the_measurement_a_close_one_runs_on_to_the_budget():
    assert precision.measured_enough({"fp32": [0.3], "bf16": [3.7]}, spent_s=4.0)  # no bf16 instructions
    assert precision.measured_enough({"fp32": [1.0], "bf16": [0.45]}, spent_s=1.5)  # bf16 far ahead
    close = {"fp32": [1.0, 1.0], "bf16": [0.8, 0.9]}
    assert not precision.measured_enough(close, spent_s=100.0)  # under MIN_ROUNDS rounds
    close = {"fp32": [1.0] * 3, "bf16": [0.9] * 3}
    assert not precision.measured_enough(close, spent_s=precision.MEASURE_BUDGET_S / 2)
    assert precision.measured_enough(close, spent_s=precision.MEASURE_BUDGET_S + 1)


def tiny_model(**sizes) -> SeemoreVLM:
    cfg = ModelConfig(**{**dict(img_size=16, patch_size=8, image_embed_dim=32, num_blks=1, n_embd=32, n_layer=1,
                                n_head=2, max_caption_len=8), **sizes})
    return SeemoreVLM(cfg, vocab_size=20)


def test_measurement_is_cached_per_shape_and_micro_batch_and_leaves_the_run_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # after import: the path is read at call time
    measured = []
    real_measure = precision.measure_step_s
    monkeypatch.setattr(precision, "measure_step_s", lambda model, batch: measured.append(batch) or real_measure(model, batch))
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    rng = torch.get_rng_state()

    first = cpu_auto_choice(model, 4)
    assert first.reason.startswith("measured: ") and measured == [4]
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # and so are its weights
    again = cpu_auto_choice(model, 4)
    assert again.precision == first.precision and measured == [4]
    assert again.reason.startswith("cached: ") and str(tmp_path / "seemore_ds" / "precision_auto.json") in again.reason
    cpu_auto_choice(model, 8)  # another micro-batch
    cpu_auto_choice(tiny_model(n_embd=64), 4)  # another shape
    assert measured == [4, 8, 4]
    cache = json.loads((tmp_path / "seemore_ds" / "precision_auto.json").read_text())
    keys = [json.loads(key) for key in cache]
    assert len(keys) == 3 and {k["micro_batch"] for k in keys} == {4, 8} and {k["model"]["n_embd"] for k in keys} == {32, 64}
    assert all(k["threads"] == torch.get_num_threads() and k["torch"] == torch.__version__ for k in keys)
    assert all(v["fp32_step_s"] > 0 and v["bf16_step_s"] > 0 for v in cache.values())
    # The pick follows the figures in the cache, whichever they are.
    key = precision.cache_key(model, 4)
    for fp32_s, bf16_s, expected in ((1.0, 0.5, "bf16"), (0.5, 1.0, "fp32")):
        cache[key] = {"fp32_step_s": fp32_s, "bf16_step_s": bf16_s}
        (tmp_path / "seemore_ds" / "precision_auto.json").write_text(json.dumps(cache))
        assert cpu_auto_choice(model, 4).precision == expected and measured == [4, 8, 4]
    assert cpu_auto_choice(model, 4, ("fp32", "fp16")).precision == "fp32"  # bf16 ruled out: nothing to measure


def forge(cache_dir: Path, key: str, winner: str) -> None:
    """A cache in which ``winner`` is twice as fast as the other precision for ``key``."""
    times = {"fp32_step_s": 1.0, "bf16_step_s": 0.5} if winner == "bf16" else {"fp32_step_s": 0.5, "bf16_step_s": 1.0}
    (cache_dir / "seemore_ds").mkdir(parents=True, exist_ok=True)
    (cache_dir / "seemore_ds" / "precision_auto.json").write_text(json.dumps({key: times}))


def picked(run_dir: Path) -> tuple[str, str]:
    """(RUN/config.yaml's train.precision, the newest checkpoint's written_by precision)."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return saved, json.loads((newest / "train_state.json").read_text())["written_by"]["precision"]


@pytest.fixture(scope="module")
def engine_free_runs(cli, tmp_path_factory):
    """Two engine-free runs at the two-node test's shape, with a cache of their own: the first measures, the
    second resumes it with the cache's figures forged so that the other precision would win."""
    work = tmp_path_factory.mktemp("auto")
    cache = work / "cache"
    args = ["train", *NODE_TINY, "train.backend=torch", "train.device=cpu", "train.precision=auto",
            "eval.every=0", "run.output_dir=run"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(cache))
        env.setenv("OMP_NUM_THREADS", "1")  # as the launches run: the thread count is part of the key
        first = cli.ok(cli(*args, "train.max_steps=2", cwd=work)).stdout
        [key] = json.loads((cache / "seemore_ds" / "precision_auto.json").read_text())
        first_recorded = picked(work / "run")
        forge(cache, key, OTHER[first_recorded[0]])
        resumed = cli.ok(cli(*args, "train.max_steps=4", "train.resume=auto", cwd=work)).stdout
    return work, key, first, first_recorded, resumed


def test_engine_free_auto_says_what_it_picked_and_the_run_records_it(engine_free_runs):
    work, key, first, (pick, written_by), resumed = engine_free_runs
    [line] = [line for line in first.splitlines() if line.startswith("precision: ")]
    assert line.startswith(f"precision: auto -> {pick} (measured: bf16 step ")
    assert f"backend TorchBackend on cpu x 1, {pick}" in first
    assert pick in ("fp32", "bf16") and written_by == pick  # RUN/config.yaml and the checkpoint: the pick, not auto
    # Resumed with the cache saying the other precision is twice as fast: the run goes on in the checkpoint's.
    checkpoint = Path("run") / "checkpoints" / "step_000002"  # as run.output_dir=run names it
    assert f"precision: auto -> {pick} (the precision {checkpoint} was trained in)" in resumed
    assert f"backend TorchBackend on cpu x 1, {pick}" in resumed and "cached:" not in resumed
    assert picked(work / "run") == (pick, pick)


def test_two_ranks_on_two_nodes_train_in_rank_0s_pick(engine_free_runs):
    """Each node has a cache of its own that says the opposite: node 0's says bf16, node 1's fp32. Every rank
    must train in rank 0's pick, or the ranks would not even reduce their gradients together."""
    key = engine_free_runs[1]
    work = Path(tempfile.mkdtemp(prefix="seemore-ds-auto-"))
    try:
        caches = [work / "cache-node0", work / "cache-node1"]
        forge(caches[0], key, "bf16")
        forge(caches[1], key, "fp32")
        node1_cache = (caches[1] / "seemore_ds" / "precision_auto.json").read_text()
        # torch keeps DeepSpeed's JIT-built ops under XDG_CACHE_HOME too: a node given a cache folder of its own
        # must still find the ops already built, or it spends minutes building deepspeed_shm_comm again.
        shared_op_builds = {"TORCH_EXTENSIONS_DIR": str(op_build_root())}
        with TwoNodes() as nodes:
            node0, node1 = nodes.launch(work, "run", [*NODE_TINY, "train.precision=auto", "train.max_steps=2"],
                                        node_env=[{"XDG_CACHE_HOME": str(cache), **shared_op_builds} for cache in caches])
        assert "precision: auto -> bf16 (cached: bf16 step 2.00x faster" in node0
        assert "precision:" not in node1  # rank 0 alone decides and says so
        assert "backend DeepSpeedBackend on cpu x 2, bf16" in node0
        assert (caches[1] / "seemore_ds" / "precision_auto.json").read_text() == node1_cache
        checkpoint = work / "run" / "checkpoints" / "step_000002"
        for rank in range(2):  # the DeepSpeed config each rank's engine ran with, saved beside its optimizer shard
            [shard_file] = checkpoint.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # bf16_ prefixed in bf16
            shard = torch.load(shard_file, map_location="cpu", weights_only=False)
            assert shard["ds_config"]["bf16"]["enabled"] is True and shard["ds_config"]["fp16"]["enabled"] is False
        assert picked(work / "run") == ("bf16", "bf16")
    finally:
        shutil.rmtree(work, ignore_errors=True)
