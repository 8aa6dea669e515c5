"""SeemoreVLM: shapes, causality, the loss mask, KV-cache generation, parameter and FLOP counts, size checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from seemore_ds.config import ModelConfig, load_config
from seemore_ds.data.dataset import CaptionData, TokenizedSplit, tokenize_captions
from seemore_ds.errors import UserError
from seemore_ds.model import IGNORE_INDEX, Attention, BatchNorm2d, SeemoreVLM, conv_flops, pool_patch_tokens
from seemore_ds.tokenizer import CharTokenizer

TINY = ModelConfig(img_size=16, patch_size=8, image_embed_dim=32, num_blks=1, n_embd=32, n_layer=1, n_head=2,
                   max_caption_len=10)
VOCAB = 12
BOS, EOS = 1, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(vocab: int = VOCAB, **changes) -> SeemoreVLM:
    torch.manual_seed(0)
    return SeemoreVLM(dataclasses.replace(TINY, **changes), vocab).eval()


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def random_ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("image_tokens, n_image_tokens", [("patches", 1 + 4), ("pooled", 1 + 1), ("cls", 1)])
def test_output_shapes(image_tokens, n_image_tokens):
    model = tiny_model(image_tokens=image_tokens)
    images, ids = random_images(3), random_ids(3, TINY.max_caption_len + 1)

    logits, loss = model(images, ids, ids)

    assert model.num_image_tokens == n_image_tokens
    assert model.encode_images(images).shape == (3, n_image_tokens, TINY.n_embd)
    # Logits cover the text positions only: image positions predict nothing.
    assert logits.shape == (3, model.text_len, VOCAB)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(images, ids)[1] is None


@pytest.mark.parametrize("decoder_updates_images", [False, True])
def test_a_future_token_cannot_change_earlier_logits(decoder_updates_images):
    model = tiny_model(n_layer=2, decoder_updates_images=decoder_updates_images)
    images, ids = random_images(2), random_ids(2, TINY.max_caption_len + 1)
    logits, _ = model(images, ids)
    for j in (0, 4, ids.shape[1] - 1):
        changed = ids.clone()
        changed[:, j] = (ids[:, j] - 4 + 1) % (VOCAB - 4) + 4  # another ordinary character
        new_logits, _ = model(images, changed)
        torch.testing.assert_close(new_logits[:, :j], logits[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(new_logits[:, j], logits[:, j]), f"the token at {j} should matter from there on"


@pytest.mark.parametrize("decoder_updates_images", [False, True])
def test_every_text_position_sees_the_image(decoder_updates_images):
    model = tiny_model(decoder_updates_images=decoder_updates_images)
    ids = random_ids(1, TINY.max_caption_len + 1)
    first, _ = model(random_images(1, seed=0), ids)
    second, _ = model(random_images(1, seed=1), ids)
    assert not torch.allclose(first[:, 0], second[:, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_attention_over_a_context_gives_the_full_sequences_last_positions(causal):
    """Queries for the last positions only, the first ones read as keys and values: the same rows (and the
    same gradients into them) as attention over the whole sequence, so the decoder's text positions see
    each image token and each earlier character exactly as when the image positions are computed too."""
    torch.manual_seed(0)
    attention = Attention(16, 2, 0.0, causal)
    x = torch.randn(2, 7, 16, requires_grad=True)
    context_len = 3
    split = attention(x[:, context_len:], x[:, :context_len])
    split.square().sum().backward()
    split_grad, x.grad = x.grad.clone(), None
    full = attention(x)[:, context_len:]
    full.square().sum().backward()
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(split_grad, x.grad)


def test_a_decoder_of_one_block_gives_the_same_logits_whether_it_updates_the_image_tokens_or_not():
    """Its image positions' outputs feed nothing, so reading the image as keys and values only changes
    nothing but the work; with two blocks the second reads what the first made of the image, and they differ."""
    images, ids = random_images(2), random_ids(2, TINY.max_caption_len + 1)
    for n_layer, same in ((1, True), (2, False)):
        updated, _ = tiny_model(n_layer=n_layer, decoder_updates_images=True)(images, ids)
        read, _ = tiny_model(n_layer=n_layer, decoder_updates_images=False)(images, ids)
        assert torch.allclose(updated, read, atol=1e-5) == same, n_layer


def test_loss_counts_caption_and_eos_only():
    captions = ["ab", "abcab", "c"]
    tokenizer = CharTokenizer.from_captions(captions)
    model = tiny_model(vocab=tokenizer.vocab_size)
    input_ids, targets = tokenize_captions(captions, tokenizer, model.text_len)
    images = random_images(len(captions))

    logits, loss = model(images, input_ids, targets)

    counted = targets != IGNORE_INDEX
    assert counted.sum(dim=1).tolist() == [len(c) + 1 for c in captions]  # every character and <eos>
    torch.testing.assert_close(loss, F.cross_entropy(logits[counted], targets[counted]))

    # Whatever sits at the padding positions cannot change the loss.
    scribbled = input_ids.clone()
    for row, caption in enumerate(captions):
        scribbled[row, len(caption) + 1:] = tokenizer.encode("c")[0]
    _, loss_scribbled = model(images, scribbled, targets)
    torch.testing.assert_close(loss_scribbled, loss, rtol=0, atol=1e-6)


def test_a_split_is_as_long_as_its_longest_caption_and_trains_to_the_same_loss_as_fully_padded():
    captions = ["ab", "abcab", "c"]
    tokenizer = CharTokenizer.from_captions(captions)
    model = tiny_model(vocab=tokenizer.vocab_size)
    images = random_images(len(captions))
    split = TokenizedSplit(CaptionData(images, captions, "test"), tokenizer, model.text_len)
    assert split.text_len == len("abcab") + 1 < model.text_len
    assert TokenizedSplit(CaptionData(images, captions, "test"), tokenizer, 4).text_len == 4  # never beyond the model's

    batch = split.batch(torch.arange(len(captions)))
    assert batch.input_ids.shape == batch.targets.shape == (len(captions), split.text_len)
    padded_ids, padded_targets = tokenize_captions(captions, tokenizer, model.text_len)
    torch.testing.assert_close(model(images, batch.input_ids, batch.targets)[1],
                               model(images, padded_ids, padded_targets)[1], rtol=1e-6, atol=0)
    assert model.flops_per_sample(split.text_len) < model.flops_per_sample()


def scrambled_model(image_tokens: str, **changes) -> SeemoreVLM:
    """Large random weights in float64, so greedy captions vary with image and position and have no near-ties.
    Norm layers keep their init: scrambled norm scales saturate the model into one repeated token."""
    model = tiny_model(image_tokens=image_tokens, **changes).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("image_tokens", ["patches", "pooled", "cls"])
@pytest.mark.parametrize("decoder_updates_images", [False, True])
def test_kv_cache_generation_equals_full_recompute(image_tokens, decoder_updates_images):
    model = scrambled_model(image_tokens, decoder_updates_images=decoder_updates_images)
    images = random_images(4, seed=1)

    with_cache = model.generate(images, BOS, EOS, use_cache=True)
    without_cache = model.generate(images, BOS, EOS, use_cache=False)

    assert with_cache == without_cache
    assert any(len(set(row)) > 1 for row in with_cache), "captions should not be one repeated token"


@pytest.mark.parametrize("image_tokens", ["patches", "pooled", "cls"])
@pytest.mark.parametrize("decoder_updates_images", [False, True])
def test_kv_cache_sampling_equals_full_recompute(image_tokens, decoder_updates_images):
    model = scrambled_model(image_tokens, decoder_updates_images=decoder_updates_images)
    images = random_images(4, seed=2)
    sample = dict(temperature=1.0, top_k=5)

    with_cache = model.generate(images, BOS, EOS, use_cache=True, generator=torch.Generator().manual_seed(3), **sample)
    without_cache = model.generate(images, BOS, EOS, use_cache=False, generator=torch.Generator().manual_seed(3), **sample)

    assert with_cache == without_cache


def model_that_favours_eos(logit: float) -> SeemoreVLM:
    model = tiny_model()
    with torch.no_grad():
        model.decoder.lm_head.weight.zero_()
        model.decoder.lm_head.bias.zero_()
        model.decoder.lm_head.bias[EOS] = logit
    return model


def test_generation_stops_at_eos():
    model = model_that_favours_eos(10.0)
    decoder_calls = []
    model.decoder.register_forward_hook(lambda *_: decoder_calls.append(1))

    captions = model.generate(random_images(3), BOS, EOS)

    assert captions == [[], [], []]
    assert len(decoder_calls) == 1, "once every caption has ended, no more tokens are computed"


def test_rows_end_independently_and_never_show_eos():
    model = model_that_favours_eos(2.0)  # <eos> drawn with probability ~0.4 at each step
    captions = model.generate(random_images(8), BOS, EOS, temperature=1.0, generator=torch.Generator().manual_seed(0))
    lengths = [len(c) for c in captions]
    assert all(EOS not in c for c in captions)
    assert len(set(lengths)) > 1
    assert max(lengths) <= model.text_len


def test_max_new_tokens_bounds_the_caption():
    model = scrambled_model("patches")
    captions = model.generate(random_images(4), BOS, EOS, max_new_tokens=3)
    assert all(len(c) <= 3 for c in captions)


def test_num_params_is_the_sum_of_parameter_sizes():
    model = tiny_model()
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
    assert tiny_model(n_embd=64).num_params() > model.num_params()


@pytest.mark.parametrize("change", [
    dict(n_embd=64), dict(n_layer=2), dict(num_blks=2), dict(image_embed_dim=64), dict(img_size=32),
    dict(max_caption_len=20), dict(stem_full_res_width=32),
])
def test_flops_per_sample_grows_with_every_size(change):
    base = tiny_model().flops_per_sample()
    assert isinstance(base, int) and base > 0
    assert tiny_model(**change).flops_per_sample() > base


@pytest.mark.parametrize("img_size, patch_size", [(16, 8), (24, 12), (28, 14), (32, 16), (9, 3)])
@pytest.mark.parametrize("patch_embed, stem_full_res_width", [("conv_stem", 16), ("conv_stem", 0), ("patch", 0)])
def test_both_patch_embeddings_give_the_patch_grid(img_size, patch_size, patch_embed, stem_full_res_width):
    model = tiny_model(img_size=img_size, patch_size=patch_size, patch_embed=patch_embed,
                       stem_full_res_width=stem_full_res_width)
    grid = img_size // patch_size
    assert model.vit.patch_embed(torch.zeros(2, 3, img_size, img_size)).shape == (2, TINY.image_embed_dim, grid, grid)


def test_the_stem_opens_with_a_convolution_at_full_resolution():
    """Its output has the image's own side; without it the stem halves the image in its first convolution."""
    images = torch.zeros(2, 3, 16, 16)
    first = tiny_model(stem_full_res_width=12).vit.patch_embed.layers[:3]  # conv, BatchNorm, ReLU
    assert first(images).shape == (2, 12, 16, 16)
    assert tiny_model(stem_full_res_width=0).vit.patch_embed.layers[0](images).shape[-1] == 8


def test_the_stem_widens_no_further_than_stem_max_width():
    """Its stride-2 convolutions double up to the limit; the last convolution still gives the ViT's width and grid."""
    def stem_channels(model):
        return [conv.out_channels for conv in model.vit.patch_embed.modules() if isinstance(conv, torch.nn.Conv2d)]

    wide = tiny_model(img_size=32, patch_size=16, image_embed_dim=128, stem_max_width=0, stem_full_res_width=0)
    capped = tiny_model(img_size=32, patch_size=16, image_embed_dim=128, stem_max_width=32, stem_full_res_width=0)
    assert stem_channels(wide) == [16, 32, 64, 128, 128]
    assert stem_channels(capped) == [16, 16, 16, 32, 128]
    assert capped.vit.patch_embed(torch.zeros(2, 3, 32, 32)).shape == (2, 128, 2, 2)
    assert capped.flops_per_sample() < wide.flops_per_sample()
    # A limit above the ViT's width changes nothing.
    assert stem_channels(tiny_model(img_size=32, patch_size=16, image_embed_dim=128, stem_max_width=512,
                                    stem_full_res_width=0)) == stem_channels(wide)


def test_conv_flops_of_the_single_patch_conv():
    model = tiny_model(patch_embed="patch")  # 2 x 2 patches of 8 x 8 x 3 pixels onto 32 channels
    assert conv_flops(model.vit.patch_embed, 16) == 2 * 4 * (8 * 8 * 3) * 32


def test_vit_keeping_only_cls_gives_the_full_vits_cls_output_and_gradients():
    """With image_tokens=cls the last ViT block computes the CLS token alone: the same math, fewer FLOPs."""
    model = tiny_model(image_tokens="cls", num_blks=2).train()
    x = random_images(3).float() / 127.5 - 1.0
    kept = model.vit(x, keep=1)
    kept.square().sum().backward()
    kept_grads = [p.grad.clone() for p in model.vit.parameters()]
    model.zero_grad()
    full = model.vit(x)[:, :1]
    full.square().sum().backward()
    assert kept.shape == (3, 1, 32)
    torch.testing.assert_close(kept, full)
    for kept_grad, p in zip(kept_grads, model.vit.parameters()):
        torch.testing.assert_close(kept_grad, p.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoder_updates_images", [False, True])
def test_flops_count_more_decoder_tokens_with_patches_than_pooled_than_cls(decoder_updates_images):
    flops = [tiny_model(image_tokens=kind, decoder_updates_images=decoder_updates_images).flops_per_sample()
             for kind in ("patches", "pooled", "cls")]
    assert flops[0] > flops[1] > flops[2]


@pytest.mark.parametrize("decoder_updates_images", [False, True])
@pytest.mark.parametrize("image_tokens", ["patches", "cls"])
def test_flops_per_sample_is_three_times_the_forwards_counted_flops(decoder_updates_images, image_tokens):
    """Against torch's own count of the forward's matmuls, convolutions and attention, op by op (attention by
    its math path, whose products the counter sees: it does not count the CPU's fused kernel)."""
    model = tiny_model(n_layer=2, decoder_updates_images=decoder_updates_images, image_tokens=image_tokens)
    images, ids = random_images(4), random_ids(4, 7)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(images, ids, ids)
    assert model.flops_per_sample(text_len=7) == pytest.approx(3 * counter.get_total_flops() / 4, rel=1e-3)


def test_pooled_tokens_average_each_square_of_patches_in_row_major_order():
    cls, grid = torch.full((1, 1, 2), -1.0), torch.arange(16.0).view(4, 4)  # patch (r, c) holds 4r + c
    tokens = torch.cat([cls, torch.stack([grid.flatten(), 10 * grid.flatten()], dim=-1)[None]], dim=1)
    pooled = pool_patch_tokens(tokens, 2)
    squares = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=torch.float)
    torch.testing.assert_close(pooled[0, 1:, 0], squares.mean(dim=1))
    torch.testing.assert_close(pooled[0, 1:, 1], 10 * squares.mean(dim=1))
    torch.testing.assert_close(pooled[:, :1], cls)
    model = tiny_model(image_tokens="pooled", img_size=32)  # a 4 x 4 grid pooled to 2 x 2
    assert model.num_image_tokens == 1 + 4 and model.encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1] == 5


@pytest.mark.parametrize("overrides, names", [
    (["model.n_embd=30", "model.n_head=4", "model.image_embed_dim=32"], ("model.n_embd", "model.n_head")),
    (["model.img_size=20", "model.patch_size=8"], ("model.img_size", "model.patch_size")),
    (["model.image_embed_dim=30", "model.n_head=4", "model.n_embd=32"], ("model.image_embed_dim", "model.n_head")),
    (["model.n_head=0"], ("model.n_head",)),
    (["model.image_tokens=pooled", "model.img_size=96", "model.patch_size=16", "model.token_pool=4"],
     ("model.token_pool", "= 6")),
])
def test_impossible_sizes_are_config_errors(overrides, names):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_stem_batchnorm_matches_torch_and_takes_bf16_weights_beside_float32_statistics():
    torch.manual_seed(0)
    ours, reference = BatchNorm2d(4).train(), torch.nn.BatchNorm2d(4).train()
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(ours(x), reference(x))
    torch.testing.assert_close(ours.running_var, reference.running_var)
    # What DeepSpeed's bf16 engine leaves: bf16 parameters and input, float32 running statistics.
    ours.weight.data, ours.bias.data = ours.weight.data.bfloat16(), ours.bias.data.bfloat16()
    out = ours.eval()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.eval()(x), atol=0.05, rtol=0.05)


def test_a_non_finite_batch_leaves_the_stem_batchnorm_statistics_alone():
    norm = BatchNorm2d(4).train()
    norm(torch.randn(8, 4, 5, 5))
    before = norm.running_mean.clone(), norm.running_var.clone()
    x = torch.randn(8, 4, 5, 5)
    x[0, 0, 0, 0] = float("nan")
    norm(x)
    torch.testing.assert_close((norm.running_mean, norm.running_var), before)


def test_settled_statistics_average_the_stem_batchnorm_inputs_of_the_images_at_the_current_weights():
    model = tiny_model()  # conv stem: four BatchNorms (full resolution, then three halvings)
    norms = [m for m in model.vit.patch_embed.modules() if isinstance(m, BatchNorm2d)]
    for norm in norms:  # statistics left behind by other weights
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(9.0)
    images = random_images(8)
    inputs = {norm: [] for norm in norms}
    hooks = [norm.register_forward_pre_hook(lambda norm, args: inputs[norm].append(args[0].detach()))
             for norm in norms]
    rng = torch.get_rng_state()
    model.settle_running_stats(images, batch_size=4)
    for hook in hooks:
        hook.remove()
    assert torch.equal(torch.get_rng_state(), rng)  # a run that settles draws the same random numbers after
    assert not model.training and all(norm.momentum == 0.1 for norm in norms)
    for norm in norms:
        first, second = inputs[norm]  # one input per batch of 4
        torch.testing.assert_close(norm.running_mean, (first.mean((0, 2, 3)) + second.mean((0, 2, 3))) / 2)
        torch.testing.assert_close(norm.running_var, (first.var((0, 2, 3)) + second.var((0, 2, 3))) / 2)
