"""The validator: at its steps, the held-out loss, the caption exact match and ``captions.png``, on the
full model that every rank enters together (under ZeRO-3 that gathers the partitioned parameters)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.distributed import ReduceOp

from seemore_ds.backends.base import Backend
from seemore_ds.config import Config
from seemore_ds.data.dataset import TokenizedSplit
from seemore_ds.evaluation import caption_matches, generate_captions, split_loss
from seemore_ds.metrics.caption_grid import CAPTIONS_FILE, write_caption_grid
from seemore_ds.metrics.processor import Validation
from seemore_ds.model import SeemoreVLM
from seemore_ds.tokenizer import CharTokenizer

CAPTION_SAMPLES = 16  # held-out images captioned into captions.png (and W&B) at each evaluation
# captions.png is redrawn at an evaluation once this long has passed since the run started or last drew it,
# and always at the last one: a long run's grid stays current, while a five-minute run draws it once rather
# than at each evaluation (about 1.5 s a drawing on 2 CPU cores). W&B, when on, gets the grid at every one.
CAPTIONS_REDRAW_S = 300.0
# A run that ends below STILL_LEARNING_BELOW held-out exact match, having gained at least STILL_LEARNING_GAIN over
# its last fifth, is told that a longer run would caption better. With 16-pixel patches and 1,000 steps (the
# 16-pixel model of docs/time_to_quality.md), polygons (counting) gained 0.04-0.12 from step 800 to 1000 on three
# seeds, and 2,000 steps reached 0.93-0.94; smaller gains are within the step-to-step wobble of a few hundred
# held-out rows.
STILL_LEARNING_BELOW = 0.95
STILL_LEARNING_GAIN = 0.03
# A run that ends below NOTHING_LEARNT_BELOW, not climbing, has captioned almost nothing right yet; it is told that
# some data needs many times the steps. Glyphs (text read off the image) with the 16-pixel model end at
# 0.000-0.007 after 1,000 steps, their loss flat for about 1,000 steps, and reach 0.95 at steps 5,600-6,200 of
# 8,000: hence NOTHING_LEARNT_STEPS_FACTOR times the run's steps. With patches half as wide (an 8 x 8 grid instead
# of 4 x 4) they reach 0.95 at steps 1,800-2,200 of 3,000, each step costing about twice as much, so sooner; with
# the ViT half as wide and half the heads too, at steps 1,600-2,200, each step 1.6x cheaper than with the finer
# grid alone (docs/time_to_quality.md). Where the finer grid has at most FINER_GRID_MAX_PATCHES patches, the advice
# names it with FINER_PATCHES_STEPS_FACTOR times the steps, and the narrower ViT where the heads halve.
NOTHING_LEARNT_BELOW = 0.05
NOTHING_LEARNT_STEPS_FACTOR = 8
FINER_PATCHES_STEPS_FACTOR = 3
FINER_GRID_MAX_PATCHES = 64


class Validator:
    def __init__(self, cfg: Config, backend: Backend, split: TokenizedSplit | None, tokenizer: CharTokenizer, is_main: bool):
        """``split``: the held-out rows, or None when the run has none (then it never runs)."""
        self.cfg, self.backend, self.split, self.tokenizer, self.is_main = cfg, backend, split, tokenizer, is_main
        self.run_dir = Path(cfg.run.output_dir)
        self._captions_drawn_at = time.monotonic()
        self.exact_matches: list[tuple[int, float]] = []  # (step, held-out exact match) of this process's evaluations

    def should_run(self, step: int) -> bool:
        """At every ``eval.every`` steps and the last one, when there is a held-out split."""
        every = self.cfg.eval.every
        return self.split is not None and (step == self.cfg.train.max_steps or (every > 0 and step % every == 0))

    def run(self, step: int) -> Validation:
        """Val loss on up to ``eval.max_batches`` batches, exact match on as many rows (at the last step the
        whole split, the run's final figure), and on rank 0 ``captions.png``; every rank calls it."""
        batch_size, max_batches = self.cfg.train.batch_size, self.cfg.eval.max_batches
        last = step == self.cfg.train.max_steps
        with self.backend.full_model() as model:
            loss = split_loss(self.backend, self.split, batch_size, max_batches)
            exact = self._exact_match(model, max_rows=0 if last else batch_size * max_batches)
            captions = None
            if self.is_main and self._draws_captions(last):  # the model is whole on rank 0 now: no other rank takes part
                captions = draw_held_out_captions(model, self.split.data, self.tokenizer, self.run_dir / CAPTIONS_FILE,
                                                  f"{self.run_dir.name}, step {step}")
                self._captions_drawn_at = time.monotonic()
        self.exact_matches.append((step, exact))
        return Validation(loss, exact, captions)

    def _draws_captions(self, last: bool) -> bool:
        return last or self.cfg.wandb.enabled or time.monotonic() - self._captions_drawn_at >= CAPTIONS_REDRAW_S

    def longer_run_advice(self) -> str | None:
        """One line for a run whose held-out exact match (evaluated by this process) ended below
        STILL_LEARNING_BELOW and was still climbing over the last fifth of its steps, or ended below
        NOTHING_LEARNT_BELOW; else None."""
        max_steps = self.cfg.train.max_steps
        if not self.exact_matches or self.exact_matches[-1][0] != max_steps:
            return None
        final = self.exact_matches[-1][1]
        earlier = [(step, exact) for step, exact in self.exact_matches if step <= 0.8 * max_steps]
        if earlier:
            step, exact = earlier[-1]
            if final < STILL_LEARNING_BELOW and final - exact >= STILL_LEARNING_GAIN:
                return (f"held-out exact match was still climbing ({exact:.3f} at step {step}, {final:.3f} at step "
                        f"{max_steps}): a longer run should caption better, e.g. train.max_steps={2 * max_steps} "
                        f"(docs/time_to_quality.md)")
        if final < NOTHING_LEARNT_BELOW:
            m, finer = self.cfg.model, self.cfg.model.patch_size // 2
            if m.patch_size % 2 == 0 and (m.img_size // finer) ** 2 <= FINER_GRID_MAX_PATCHES:
                # Four times the ViT's tokens at half its width: each step costs less than the finer grid alone.
                narrower = (f" model.image_embed_dim={m.image_embed_dim // 2} model.n_head={m.n_head // 2}"
                            if m.n_head % 2 == 0 else "")  # both widths divide by the heads, so by half the heads
                longer = f"model.patch_size={finer}{narrower} train.max_steps={FINER_PATCHES_STEPS_FACTOR * max_steps}"
            else:
                longer = f"train.max_steps={NOTHING_LEARNT_STEPS_FACTOR * max_steps}"
            return (f"held-out exact match ended at {final:.3f}: the model captions almost no held-out image right yet; "
                    f"some captions take many times the steps (text read off the image: 1,500-1,600 with the default "
                    f"8-pixel patches, about 6,000 with 16-pixel ones), so if these captions can be told from the "
                    f"images, try a longer run, e.g. {longer} (docs/time_to_quality.md)")
        return None

    def exact_match(self) -> float:
        """The exact match over the whole held-out split; every rank calls it."""
        with self.backend.full_model() as model:
            return self._exact_match(model, max_rows=0)

    def _exact_match(self, model: SeemoreVLM, max_rows: int) -> float:
        """Fraction of held-out rows (the first ``max_rows``; 0: all) captioned exactly right, over all ranks."""
        matches, n = caption_matches(model, self.split, self.tokenizer, self.backend.rank, self.backend.world_size,
                                     max_rows=max_rows)
        total = self.backend.all_reduce(torch.tensor([matches, n], dtype=torch.float64, device=self.backend.device),
                                        ReduceOp.SUM)
        return (total[0] / total[1]).item()


def draw_held_out_captions(model: SeemoreVLM, data, tokenizer: CharTokenizer, out: Path, title: str):
    """Caption the first CAPTION_SAMPLES held-out images (``data``: CaptionData) and draw them into
    ``out``; returns (images, captions, references, out)."""
    n = min(CAPTION_SAMPLES, len(data))
    images = data.images_at(torch.arange(n)).cpu()
    captions, references = generate_captions(model, images, tokenizer), data.captions[:n]
    return images, captions, references, write_caption_grid(images.numpy(), captions, references, out, title)
