"""The dtypes of ``train.precision``, and ``auto``: the precision that trains this model fastest on this machine.

On a GPU the rule needs no measurement: bf16 where the GPU supports it, else fp16 with loss scaling.
On a CPU it depends on the CPU and on the model (bf16 instructions or not; small matmuls pay more for
autocast's casts than they gain), so a few training steps of the run's own model, at its micro-batch,
are timed in fp32 and in bf16, taking turns; bf16 must be clearly faster to win. The figures are
cached per machine, model shape and micro-batch (docs/precision.md), so a run measures once.

In a distributed run rank 0 decides and every rank takes its answer (``agreed_precision``): ranks
measuring side by side on shared cores would disagree, and ranks in different precisions cannot train
together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from seemore_ds.config import Config
from seemore_ds.measured_cache import cache_path, read_cache, write_cache
from seemore_ds.optim import param_groups

AUTO = "auto"
PRECISIONS = ("fp32", "bf16", "fp16")
# bf16 is picked on a CPU only when its step is at least this much faster: a near tie goes to fp32,
# whose numbers need no second thought, and measurement noise of a few percent cannot flip the pick.
BF16_MIN_SPEEDUP = 1.05
WARMUP_STEPS = 2  # per precision, untimed: allocation, autocast's first casts, oneDNN's kernel choice
TIMED_ROUNDS = 5  # each round times one fp32 and one bf16 step
MEASURE_BUDGET_S = 20.0  # a large model stops after this much timed work, with at least MIN_ROUNDS rounds
MIN_ROUNDS = 3
# A round in which one precision's step takes more than this many times the other's decides at once: no
# noise flips a gap that wide, and on a CPU without bf16 instructions each bf16 step costs seconds.
DECISIVE_RATIO = 2.0
CACHE_NAME = "precision_auto.json"
# CPU flags that change how fast bf16 (or fp32) matmuls run; the cache is keyed by those present.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


# Reduced-precision dtype of each train.precision; fp32 has none.
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a matmul of this precision runs in: bf16, fp16, or float32 for fp32."""
    return PRECISION_DTYPES.get(precision, torch.float32)


@dataclass(frozen=True)
class Choice:
    """What ``auto`` became and why, for the run's one console line."""

    precision: str
    reason: str

    def line(self) -> str:
        return f"precision: auto -> {self.precision} ({self.reason})"


def gpu_choice(gpu_name: str, bf16_supported: bool, candidates: tuple[str, ...] = PRECISIONS) -> Choice:
    """The GPU rule: bf16 where supported, else fp16 with loss scaling, among ``candidates`` (what a
    DeepSpeed JSON leaves open); fp32 when neither is open."""
    if bf16_supported and "bf16" in candidates:
        return Choice("bf16", f"{gpu_name} supports bf16")
    if "fp16" in candidates:
        why = "has no bf16" if not bf16_supported else "bf16 is turned off by the DeepSpeed config"
        return Choice("fp16", f"{gpu_name} {why}: fp16 with loss scaling")
    return Choice("fp32", "the DeepSpeed config turns off bf16 and fp16")


def cpu_choice(fp32_step_s: float, bf16_step_s: float, cached: str = "") -> Choice:
    """The CPU rule, given the measured step times: bf16 only if at least BF16_MIN_SPEEDUP times faster.
    ``cached``: where the figures were read from, when they were not measured now."""
    speedup = fp32_step_s / bf16_step_s
    if speedup >= BF16_MIN_SPEEDUP:
        precision, how = "bf16", f"bf16 step {speedup:.2f}x faster on this CPU"
    elif speedup >= 1:
        precision, how = "fp32", f"bf16 step only {speedup:.2f}x faster on this CPU, under the {BF16_MIN_SPEEDUP:.2f}x it must reach"
    else:
        precision, how = "fp32", f"bf16 step {1 / speedup:.2f}x slower on this CPU"
    return Choice(precision, f"cached: {how}; {cached}" if cached else f"measured: {how}")


def cpu_facts() -> dict:
    """What makes two CPUs train alike: model name, the speed flags present, threads, torch version."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "flags": [flag for flag in SPEED_FLAGS if flag in flags],
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def cache_key(model: torch.nn.Module, micro_batch: int) -> str:
    """This machine, this model's shape (its config and vocabulary) and the micro-batch, as one string."""
    shape = {**dataclasses.asdict(model.cfg), "vocab_size": model.vocab_size}
    return json.dumps({**cpu_facts(), "model": shape, "micro_batch": micro_batch}, sort_keys=True)


def measure_step_s(model: torch.nn.Module, micro_batch: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, fused AdamW step) of a copy of ``model``
    on the CPU at ``micro_batch``, in fp32 and in bf16 autocast, timed in alternating turns.

    Runs on a copy with random inputs under a forked RNG: the run's weights and random streams are
    exactly what they would have been without the measurement."""
    with torch.random.fork_rng(devices=[]):
        probe = copy.deepcopy(model).to("cpu").train()
        optimizer = torch.optim.AdamW(param_groups(probe, 0.0), lr=1e-6, fused=True)
        size = probe.cfg.img_size
        images = torch.randint(0, 256, (micro_batch, 3, size, size), dtype=torch.uint8)
        input_ids = torch.randint(0, probe.vocab_size, (micro_batch, probe.text_len))
        targets = torch.randint(0, probe.vocab_size, (micro_batch, probe.text_len))

        def step_s(precision: str) -> float:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                _, loss = probe(images, input_ids, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        for _ in range(WARMUP_STEPS):
            step_s("fp32"), step_s("bf16")
        times = {"fp32": [], "bf16": []}
        spent = 0.0
        for round_ in range(TIMED_ROUNDS):
            order = ("fp32", "bf16") if round_ % 2 == 0 else ("bf16", "fp32")  # neither always runs first
            for precision in order:
                times[precision].append(step_s(precision))
                spent += times[precision][-1]
            if measured_enough(times, spent):
                break
    return {f"{precision}_step_s": statistics.median(samples) for precision, samples in times.items()}


def measured_enough(times: dict[str, list[float]], spent_s: float) -> bool:
    """After a round of ``times`` (seconds per step, by precision): has the pick been settled? Yes when the
    last round was decisive, or after MIN_ROUNDS rounds once MEASURE_BUDGET_S seconds were spent."""
    ratio = times["bf16"][-1] / times["fp32"][-1]
    decisive = not 1 / DECISIVE_RATIO < ratio < DECISIVE_RATIO
    return decisive or (len(times["fp32"]) >= MIN_ROUNDS and spent_s > MEASURE_BUDGET_S)


def cpu_auto_choice(model: torch.nn.Module, micro_batch: int, candidates: tuple[str, ...] = PRECISIONS) -> Choice:
    """The CPU pick for ``model`` at ``micro_batch``: from the cache, or measured now and cached."""
    if "bf16" not in candidates:
        return Choice("fp32", "the DeepSpeed config turns off bf16; fp16 needs a GPU")
    key = cache_key(model, micro_batch)
    times = read_cache(CACHE_NAME).get(key)
    if isinstance(times, dict) and all(isinstance(times.get(k), (int, float)) and times[k] > 0
                                       for k in ("fp32_step_s", "bf16_step_s")):
        return cpu_choice(times["fp32_step_s"], times["bf16_step_s"], cached=str(cache_path(CACHE_NAME)))
    times = measure_step_s(model, micro_batch)
    write_cache(CACHE_NAME, {**read_cache(CACHE_NAME), key: times})
    return cpu_choice(times["fp32_step_s"], times["bf16_step_s"])


def auto_choice(model: torch.nn.Module, micro_batch: int, device: torch.device,
                candidates: tuple[str, ...] = PRECISIONS) -> Choice:
    """What ``train.precision=auto`` means for ``model`` at ``micro_batch`` on ``device``."""
    if device.type == "cuda":
        return gpu_choice(torch.cuda.get_device_name(device), torch.cuda.is_bf16_supported(), candidates)
    return cpu_auto_choice(model, micro_batch, candidates)


def with_precision(cfg: Config, precision: str) -> Config:
    """A copy of ``cfg`` that says the precision the run trains in (``cfg`` itself is left as loaded)."""
    settled = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    settled.explicit_keys = cfg.explicit_keys  # what the user set still outranks a DeepSpeed JSON
    return settled


def keep_checkpoint_precision(cfg: Config, checkpoint_precision: str, checkpoint: str, say: Callable[[str], None]) -> Config:
    """``auto`` on a resumed run is the precision the checkpoint was trained in (``cfg`` unchanged otherwise).

    A pick that changed between runs (another machine, a deleted cache) would change the run's numbers
    midway, and DeepSpeed cannot load a checkpoint of one precision natively into an engine of another."""
    if cfg.train.precision != AUTO:
        return cfg
    say(Choice(checkpoint_precision, f"the precision {checkpoint} was trained in").line())
    return with_precision(cfg, checkpoint_precision)


def agreed_precision(decide: Callable[[], Choice], rank: int, device: torch.device) -> str:
    """Rank 0's ``decide()``, the same on every rank (a broadcast: every rank calls it); rank 0 prints why.

    Call with the process group up. A failure on rank 0 reaches every rank, so none waits forever."""
    import torch.distributed as dist

    message: list = [None]
    if rank == 0:
        try:
            message = [decide()]
        except Exception as err:  # handed to every rank, then raised on each (a UserError stays one)
            message = [err]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0, device=device if device.type == "cuda" else None)
    [answer] = message
    if isinstance(answer, Exception):
        raise answer
    if rank == 0:
        print(answer.line(), flush=True)
    return answer.precision
