"""``python -m seemore_ds plan``: which ZeRO stage, offload, micro-batch and accumulation fit the hardware.

For the run config's model and a target (GPUs per node x nodes with their memory, or CPU ranks) it
estimates, per rank and per choice, the bytes of what training holds: parameters, gradients, Adam
state, fp32 master copies, DeepSpeed's buffers, the activations of one micro-batch (what autograd
saves, from the model's shapes), and the bytes each rank sends per optimizer step. It then picks the
lowest stage that fits, offload only when nothing else fits, the largest micro-batch that fits and
the accumulation that reaches the global batch, and can write that choice as a DeepSpeed JSON.

The model-state figures follow what DeepSpeed 0.19 allocates (``bench.plan_accuracy`` measures them
on CPU ranks); a GPU also holds the CUDA context and allocator slack, which ``HEADROOM`` leaves free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from seemore_ds.config import Config, ModelConfig
from seemore_ds.errors import UserError
from seemore_ds.model import conv_stem_widths

GIB = 2**30
HEADROOM = 0.85  # share of a device's memory a plan may fill: context, fragmentation, temporaries
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32, per parameter
# DeepSpeed's bucket defaults (elements); seemore-ds's JSONs set reduce_bucket_size to n_embd^2 ("auto").
ALLGATHER_BUCKET = 500_000_000
VOCAB_GUESS = 96  # characters of a caption set; the tokenizer is built from the data, so the plan assumes printable ASCII


@dataclass(frozen=True)
class Target:
    """Where the run goes: ``ranks`` data-parallel processes, ``device_bytes`` each, ``host_bytes`` per rank."""

    ranks: int
    device: str  # "gpu" | "cpu"
    device_bytes: float  # memory one rank's device may hold (for CPU ranks: its share of host memory)
    host_bytes: float  # host memory per rank, for offloaded state

    def describe(self) -> str:
        if self.device == "cpu":
            return f"{self.ranks} CPU rank(s), {self.device_bytes / GIB:.0f} GiB each"
        return f"{self.ranks} GPU(s) of {self.device_bytes / GIB:.0f} GiB, {self.host_bytes / GIB:.0f} GiB host memory per GPU"


@dataclass(frozen=True)
class Choice:
    stage: int
    offload_optimizer: bool = False
    offload_param: bool = False

    def name(self) -> str:
        parts = [f"ZeRO-{self.stage}"]
        if self.offload_optimizer:
            parts.append("optimizer->CPU")
        if self.offload_param:
            parts.append("params->CPU")
        return " ".join(parts)


CHOICES = [Choice(0), Choice(1), Choice(2), Choice(3), Choice(2, True), Choice(3, True), Choice(3, True, True)]


@dataclass
class Estimate:
    """Bytes one rank holds (device and host) and sends per optimizer step, for one choice and micro-batch."""

    choice: Choice
    micro_batch: int
    params: float
    grads: float
    optimizer: float  # Adam moments
    master: float  # fp32 master weights (bf16/fp16 training; ZeRO's fp32 partition in fp32 training)
    buffers: float  # DeepSpeed's reduce / all-gather buckets, stage-3 prefetch and persistent parameters
    activations: float  # one micro-batch
    host: float  # offloaded state
    comm: float  # bytes sent per rank per optimizer step

    @property
    def device(self) -> float:
        return self.params + self.grads + self.optimizer + self.master + self.buffers + self.activations


def shape_of(m: ModelConfig, vocab: int):
    """SeemoreVLM of these sizes on the meta device: its shapes and counts, no memory."""
    import torch

    from seemore_ds.model import SeemoreVLM

    with torch.device("meta"):
        return SeemoreVLM(m, vocab)


def count_params(m: ModelConfig, vocab: int) -> int:
    """Parameters of SeemoreVLM for these sizes, without building it."""
    return shape_of(m, vocab).num_params()


def activation_bytes(m: ModelConfig, vocab: int, micro_batch: int, precision: str) -> float:
    """What autograd saves in one forward of ``micro_batch`` samples, from the model's shapes.

    Per transformer block of T tokens, width C, H heads: 16·T·C values (LayerNorm, QKV, attention
    q/k/v/out, projections, the MLP's 4C hidden and GELU) plus T·(4 + H) fp32 statistics (LayerNorm
    mean/rstd, attention log-sum-exp); 4·T·C + 12·C per query when only one is computed (cls). Around them: the conv stem, the projector (9·T·D), the
    decoder's final LayerNorm, the logits and their log-softmax. Checked by bench.plan_accuracy.
    """
    b = 2 if precision in ("bf16", "fp16") else 4
    patches = (m.img_size // m.patch_size) ** 2
    vit_tokens, d = patches + 1, m.image_embed_dim
    image_tokens = shape_of(m, vocab).num_image_tokens  # what the projector and decoder see
    vit_out = 1 if m.image_tokens == "cls" else vit_tokens  # what the ViT's last block computes
    text = m.max_caption_len + 1
    dec_tokens, c = image_tokens + text, m.n_embd

    def block(tokens: int, width: int, out: int | None = None) -> float:
        """``out``: the positions the block computes beyond keys and values (the ViT's last block in cls mode)."""
        out = tokens if out is None else out
        return (4 * tokens + 12 * out) * width * b + (2 * tokens + (2 + m.n_head) * out) * 4

    stem = 3 * m.img_size**2 * b  # the normalised image, input of the first convolution
    if m.patch_embed == "conv_stem":
        side = m.img_size
        stem += 2 * m.stem_full_res_width * side * side * b  # the stride-1 convolution's, at full resolution
        for width in conv_stem_widths(m.patch_size, d, m.stem_max_width):
            side = (side + 1) // 2
            stem += 2 * width * side * side * b  # BatchNorm's input and ReLU's output (the next conv's input)
    vit = stem + patches * d * b + vit_tokens * 2 * 4  # patch LayerNorm input and statistics
    vit += (m.num_blks - 1) * block(vit_tokens, d) + block(vit_tokens, d, vit_out)
    vit += vit_out * d * b + vit_out * 2 * 4  # final LayerNorm
    if m.image_tokens == "pooled":
        vit += patches * d * b  # the patch grid average-pooled (a contiguous copy)
    projector = 9 * image_tokens * d * b
    if m.decoder_updates_images:
        decoder = m.n_layer * block(dec_tokens, c) + dec_tokens * c * b + dec_tokens * 2 * 4  # + ln_f
        decoder += dec_tokens * c * b  # lm_head input (ln_f's output)
    else:  # the blocks compute the text positions; the image tokens enter each as keys and values (3 values
        # per position: the normed positions side by side, their keys and values) and one LayerNorm's statistics
        decoder = m.n_layer * (block(text, c) + 3 * image_tokens * c * b + image_tokens * 2 * 4)
        decoder += image_tokens * c * b  # the image tokens, read by every block
        decoder += 2 * text * c * b + text * 2 * 4  # ln_f and the lm_head input
    head = text * vocab * b + text * vocab * 4 + text * 8 * 2  # logits, fp32 log-softmax, token ids and targets
    return micro_batch * (vit + projector + decoder + head)


def estimate(psi: int, activations_per_sample: float, choice: Choice, micro_batch: int, ranks: int, precision: str,
             n_embd: int) -> Estimate:
    """Per-rank bytes for ``psi`` parameters on ``ranks`` data-parallel ranks (DeepSpeed 0.19's allocations)."""
    low = precision in ("bf16", "fp16")
    p_bytes = 2 if low else 4
    n, stage = ranks, choice.stage
    shard = lambda total: total / n  # noqa: E731
    params = p_bytes * psi if stage < 3 else shard(p_bytes * psi)
    # Stage 0 keeps whole gradients; DeepSpeed 0.19 reduces stage-1 gradients into this rank's partition in
    # the backward, as stage 2 does (fp32 partitions for the optimizer in bf16/fp16 training).
    grads = p_bytes * psi if stage == 0 else shard(4 * psi if low else p_bytes * psi)
    optimizer = ADAM_BYTES * psi if stage == 0 else shard(ADAM_BYTES * psi)
    # ZeRO 1-3 step an fp32 partition copied from the (flattened) parameters, in fp32 training too;
    # bf16/fp16 at stage 0 keep a whole fp32 master copy.
    master = shard(4 * psi) if stage > 0 else (4 * psi if low else 0.0)
    if stage == 0 and low:
        grads += 4 * psi  # BF16_Optimizer accumulates fp32 gradients beside the bf16 ones
    reduce_bucket = n_embd * n_embd  # elements, as "auto" resolves it
    buffers = 0.0
    if stage in (1, 2):
        buffers = min(reduce_bucket, psi) * p_bytes * 2  # two reduce buckets with overlap_comm
    if stage == 3:
        prefetch = int(0.9 * reduce_bucket)
        buffers = (reduce_bucket + prefetch) * p_bytes + 10 * n_embd * p_bytes  # + persistent small params
    host = 0.0
    if choice.offload_optimizer:
        host += optimizer + master + (shard(4 * psi) if stage >= 2 else 0)
        optimizer = master = 0.0
    if choice.offload_param:
        host += params
        params = min(psi, 2 * reduce_bucket) * p_bytes  # the layers being gathered
    # Ring collectives send (n-1)/n of the data: stage 0-2 all-reduce (or reduce-scatter + all-gather)
    # the gradients and, above stage 0, all-gather the updated parameters; stage 3 gathers the params
    # twice (forward, backward) and reduce-scatters the gradients.
    ring = (n - 1) / n
    comm = ring * p_bytes * psi * (2 if stage < 3 else 3)
    return Estimate(choice, micro_batch, params, grads, optimizer, master, buffers,
                    micro_batch * activations_per_sample, host, comm)


def target_from_args(nodes: int, gpus_per_node: int, gpu_mem_gib: float, cpu_mem_gib: float, device: str,
                     ranks: int | None) -> Target:
    """The hardware the user named on the command line."""
    if device == "cpu":
        n = ranks or 1
        return Target(n, "cpu", cpu_mem_gib * GIB / n, cpu_mem_gib * GIB / n)
    if ranks is not None:
        raise UserError("plan: --ranks is for --device cpu; for GPUs give --nodes and --gpus-per-node")
    n = nodes * gpus_per_node
    return Target(n, "gpu", gpu_mem_gib * GIB, cpu_mem_gib * GIB / gpus_per_node)


def planned_precision(cfg: Config, target: Target) -> str:
    """The precision whose bytes a run of ``cfg`` on ``target`` holds. ``auto`` trains in bf16 or fp16 on a GPU
    (two bytes either way); on a CPU it picks what a short measurement there finds faster, and fp32, the
    larger, keeps the plan on the safe side."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if target.device == "gpu" else "fp32"


def plan(cfg: Config, target: Target, global_batch: int) -> tuple[list[Estimate], Estimate | None]:
    """(the estimate of every choice at its largest fitting micro-batch, the chosen one or None)."""
    if global_batch % target.ranks:
        raise UserError(f"plan: the global batch ({global_batch}) must be a multiple of the {target.ranks} rank(s); "
                        f"choose --global-batch {max(1, global_batch // target.ranks) * target.ranks}")
    per_rank = global_batch // target.ranks
    precision = planned_precision(cfg, target)
    psi = count_params(cfg.model, VOCAB_GUESS)
    per_sample = activation_bytes(cfg.model, VOCAB_GUESS, 1, precision)
    budget = target.device_bytes * HEADROOM
    rows, chosen = [], None
    for choice in CHOICES:
        if choice.offload_optimizer and target.device == "cpu":
            continue  # the optimizer is on the host already
        micro_batches = [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
        fitting = None
        for micro in micro_batches:
            e = estimate(psi, per_sample, choice, micro, target.ranks, precision, cfg.model.n_embd)
            if e.device <= budget and e.host <= target.host_bytes * HEADROOM:
                fitting = e
                break
        rows.append(fitting or estimate(psi, per_sample, choice, 1, target.ranks, precision, cfg.model.n_embd))
        if fitting and chosen is None:
            chosen = fitting
    return rows, chosen


def ds_json(chosen: Estimate, per_rank_batch: int) -> dict:
    """The DeepSpeed JSON of a plan: every value seemore-ds shares with the YAML left "auto" but the batch."""
    zero = {"stage": chosen.choice.stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if chosen.choice.stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    if chosen.choice.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if chosen.choice.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": chosen.micro_batch,
        "gradient_accumulation_steps": per_rank_batch // chosen.micro_batch,
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def plan_table(rows: list[Estimate], chosen: Estimate | None, target: Target, budget: float) -> str:
    """The per-rank table (GiB, or MiB for small models), with the choice marked."""
    unit, scale = ("GiB", GIB) if max(e.device for e in rows) >= GIB else ("MiB", 2**20)
    lines = [f"| choice | micro-batch | params {unit} | grads | Adam | fp32 master | buffers | activations | device total | "
             f"host | comm/step | fits |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for e in rows:
        fits = "yes" if e.device <= budget and e.host <= target.host_bytes * HEADROOM else "no"
        mark = " **<- chosen**" if e is chosen else ""
        cells = " | ".join(f"{value / scale:.2f}" for value in (e.params, e.grads, e.optimizer, e.master, e.buffers,
                                                                 e.activations, e.device, e.host, e.comm))
        lines.append(f"| {e.choice.name()} | {e.micro_batch} | {cells} | {fits}{mark} |")
    return "\n".join(lines)


def run_plan(cfg: Config, target: Target, global_batch: int | None, out: str | None) -> str:
    """The text ``plan`` prints; writes the chosen JSON to ``out`` when given."""
    global_batch = global_batch or cfg.train.batch_size * cfg.train.grad_accum * target.ranks
    rows, chosen = plan(cfg, target, global_batch)
    psi = count_params(cfg.model, VOCAB_GUESS)
    budget = target.device_bytes * HEADROOM
    precision = planned_precision(cfg, target)
    if precision != cfg.train.precision:
        precision = f"{cfg.train.precision} (planned as {precision})"
    text = [f"plan: {psi / 1e6:.1f}M parameters, {precision}, global batch {global_batch} on {target.describe()}; "
            f"per rank (a plan fills at most {HEADROOM:.0%} of a device); comm = bytes each rank sends per optimizer step",
            plan_table(rows, chosen, target, budget)]
    if chosen is None:
        raise UserError("\n".join(text[:2] + ["plan: nothing fits, even one sample per rank with ZeRO-3 and every offload; "
                                              "use more or larger devices, or a smaller model"]))
    accum = global_batch // target.ranks // chosen.micro_batch
    text.append(f"choice: {chosen.choice.name()}, train_micro_batch_size_per_gpu {chosen.micro_batch}, "
                f"gradient_accumulation_steps {accum} ({chosen.micro_batch} x {accum} x {target.ranks} rank(s) = {global_batch})")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(ds_json(chosen, global_batch // target.ranks), indent=2) + "\n", encoding="utf-8")
        text.append(f"wrote {out}; train with it unchanged: deepspeed ... --module seemore_ds train --config YOUR.yaml --deepspeed_config {out}")
    return "\n".join(text)
