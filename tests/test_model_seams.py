"""The shared GPT's seams (issue 8): each proved against a peer or a property, and each check shown
to reject a mutant, a deliberately broken variant of what it checks.

- hidden states and the piecewise forward: ``embed`` -> ``blocks[i]`` -> ``head`` is ``forward``;
- the FFN seam: a registered FFN replaces the MLP, its auxiliary loss reaches the training gradient;
- heads read from the projection: pruned heads and tensor-parallel shards of heads;
- ``tie_embeddings=False``: a separate head that trains, saves, loads and matches HF untied;
- strict loading: ``from_state`` / ``load_strict`` name every missing or unexpected key;
- ``resize_token_embeddings``: old rows and old logits kept, new rows near the mean, ties kept.

The ragged-batch and hidden-state equivalences with HF GPT-2 are spec checks
(``specs/01_char_gpt.toml``, run by tests/test_specs.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

from impl.gpt.model import GPT, MLP, CausalSelfAttention, GPTConfig, call_attention, get_ffn, lm_loss, register_ffn
from impl.train.loop import train_step
from reference import hf_gpt2
from tests.cases.gpt import padding_mask

VOCAB, BLOCK = 11, 16


def tiny_config(**overrides) -> GPTConfig:
    """Two layers, four heads of width 4: small enough for float64 checks in milliseconds."""
    return GPTConfig(**{"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 2, "n_head": 4, "n_embd": 16,
                        **overrides})


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).to(dtype).eval()


def tokens(batch: int = 3, length: int = 9, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- hidden states: the forward run piecewise -------------------------------------------------------

def check_piecewise(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None,
                    states_of: Callable[..., list[torch.Tensor]]) -> None:
    """``states_of(model, idx, mask)`` (the hidden states) must be the embeddings, then each block
    applied by hand to the previous state, and ``head`` of the last must be forward's logits."""
    states = states_of(model, idx, mask)
    assert len(states) == model.config.n_layer + 1
    positions = model.positions(idx, 0, mask)
    key_valid = None if mask is None else mask.bool()
    x = model.embed(idx, positions)
    assert torch.equal(states[0], x), "hidden state 0 is not the embeddings"
    for i, block in enumerate(model.blocks):
        x = block(x, None, key_valid)
        assert torch.equal(states[i + 1], x), f"hidden state {i + 1} is not block {i}'s output"
    assert torch.equal(model.head(states[-1]), model(idx, attention_mask=mask)), "head(last state) != forward"


def _states(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    return model.hidden_states(idx, attention_mask=mask)


def _states_shifted_by_one_layer(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    states = model.hidden_states(idx, attention_mask=mask)
    return states[1:] + states[-1:]


@pytest.mark.parametrize("side", [None, "left", "right"])
@torch.no_grad()
def test_running_the_blocks_one_at_a_time_by_hand_gives_the_hidden_states_and_forwards_logits(side):
    mask = None if side is None else padding_mask([9, 4, 1], 9, side)
    check_piecewise(tiny_model(), tokens(), mask, _states)


@torch.no_grad()
def test_the_piecewise_check_rejects_hidden_states_shifted_by_one_layer():
    with pytest.raises(AssertionError, match="hidden state 0"):
        check_piecewise(tiny_model(), tokens(), None, _states_shifted_by_one_layer)


@torch.no_grad()
def test_hidden_states_of_a_padded_batch_equal_hfs_at_real_positions():
    model = tiny_model()
    idx, mask = tokens(), padding_mask([9, 4, 1], 9, "left")
    config, state = model.config.to_dict(), model.state_dict()
    ours = model.hidden_states(idx, attention_mask=mask)
    ours = ours[:-1] + [model.ln_f(ours[-1])]  # HF's last hidden state is after the final LayerNorm
    theirs = hf_gpt2.hidden_states(config, state, idx, mask)
    real = mask.bool()
    assert len(ours) == len(theirs) == model.config.n_layer + 1
    for layer, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a[real], b[real], rtol=1e-10, atol=1e-10), f"layer {layer}"


# --- the FFN seam and its auxiliary loss ------------------------------------------------------------

AUX_WEIGHT = 50.0  # large enough that the aux gradient stands far above float rounding


class SquarePenaltyMLP(MLP):
    """GPT-2's MLP plus an auxiliary loss: ``AUX_WEIGHT`` x the mean square of its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        self.aux_loss = AUX_WEIGHT * y.float().pow(2).mean()
        return y


register_ffn("test_square_penalty", SquarePenaltyMLP)


def step_without_aux(model, optimizer, batches, dtype="fp32", scaler=None, grad_clip=1.0):
    """Mutant of ``train_step``: the language-model loss alone (the FFN's aux loss dropped)."""
    for x, y in batches:
        (lm_loss(model(x), y) / len(batches)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_aux_loss_in_gradient(step: Callable, gradient_checkpointing: bool = False) -> None:
    """One ``step`` of SGD (lr 1, no clipping) on two micro-batches must move every parameter by
    minus the gradient of the hand-computed loss: the mean over micro-batches of the LM loss plus
    every layer's aux loss."""
    model = tiny_model(ffn="test_square_penalty", gradient_checkpointing=gradient_checkpointing).train()
    batches = [(tokens(2, 8, seed), tokens(2, 8, seed + 10)) for seed in (1, 2)]
    reference = copy.deepcopy(model)
    hand = sum(lm_loss(reference(x), y) + sum(AUX_WEIGHT * b.mlp(b.ln_2(h)).pow(2).mean() for b, h in
                                               zip(reference.blocks, _block_mids(reference, x), strict=True))
               for x, y in batches) / len(batches)
    hand.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, torch.optim.SGD(model.parameters(), lr=1.0), batches, grad_clip=0.0)
    for name, p in model.named_parameters():
        expected = before[name] - dict(reference.named_parameters())[name].grad
        assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-9), f"{name} moved by another gradient"


def _block_mids(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each block's residual stream after its attention (the FFN's input before ln_2), by hand."""
    x, mids = model.embed(idx, model.positions(idx)), []
    for block in model.blocks:
        x = x + block.attn(block.ln_1(x))
        mids.append(x)
        x = x + block.mlp(block.ln_2(x))
    return mids


def test_a_registered_ffn_replaces_the_mlp_in_every_block_under_gpt2s_weight_names():
    model = tiny_model(ffn="test_square_penalty")
    assert all(type(block.mlp) is SquarePenaltyMLP for block in model.blocks)
    plain = tiny_model(seed=1)
    loaded = GPT.from_state({**plain.config.to_dict(), "ffn": "test_square_penalty"}, plain.state_dict())
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(idx), plain(idx)), "the same weights under another FFN class"


def test_aux_loss_sums_every_layers_last_aux_loss_and_is_none_for_the_plain_mlp():
    model, idx = tiny_model(ffn="test_square_penalty"), tokens()
    model(idx)
    assert torch.equal(model.aux_loss(), torch.stack([b.mlp.aux_loss for b in model.blocks]).sum())
    plain = tiny_model()
    plain(idx)
    assert plain.aux_loss() is None


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["stored", "recomputed"])
def test_a_training_step_follows_the_gradient_of_lm_loss_plus_aux_loss(gradient_checkpointing):
    check_aux_loss_in_gradient(train_step, gradient_checkpointing)


def test_the_aux_gradient_check_rejects_a_step_that_drops_the_aux_loss():
    with pytest.raises(AssertionError, match="moved by another gradient"):
        check_aux_loss_in_gradient(step_without_aux)


def test_an_unknown_ffn_name_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown ffn 'moe_typo'; known: .*mlp") as e:
        GPT(tiny_config(ffn="moe_typo"))
    assert "test_square_penalty" in str(e.value)
    assert get_ffn("mlp") is MLP


# --- heads read from the projection: pruning and tensor-parallel shards ----------------------------

class HeadsFromConfig(CausalSelfAttention):
    """Mutant: the head count fixed by the config (heads n_embd // config.n_head wide), the way a
    layer counted heads before issue 8, so a layer holding fewer heads splits them wrongly."""

    def forward(self, x, cache=None, key_valid=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=2)
        q, k, v = (t.view(B, T, self.config_n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = call_attention(self.attend, q, k, v, key_valid).transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


def with_heads_from_config(model: GPT) -> GPT:
    for block in model.blocks:
        block.attn.__class__ = HeadsFromConfig
        block.attn.config_n_head = model.config.n_head
    return model


def head_rows(attn: CausalSelfAttention, heads: list[int]) -> torch.Tensor:
    """Row indices of ``c_attn`` (q, k and v parts) and columns of ``c_proj`` for ``heads``."""
    hs, width = attn.head_dim, attn.c_proj.in_features
    cols = torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in heads])
    return torch.cat([part * width + cols for part in range(3)]), cols


@torch.no_grad()
def keep_heads(attn: CausalSelfAttention, heads: list[int], proj_bias: bool = True) -> None:
    """Slice ``attn`` in place down to ``heads``: their q, k, v rows and their c_proj columns."""
    rows, cols = head_rows(attn, heads)
    c_attn = nn.Linear(attn.c_attn.in_features, len(rows), bias=attn.c_attn.bias is not None).to(attn.c_attn.weight)
    c_attn.weight.copy_(attn.c_attn.weight[rows])
    if attn.c_attn.bias is not None:
        c_attn.bias.copy_(attn.c_attn.bias[rows])
    has_bias = proj_bias and attn.c_proj.bias is not None
    c_proj = nn.Linear(len(cols), attn.c_proj.out_features, bias=has_bias).to(attn.c_proj.weight)
    c_proj.weight.copy_(attn.c_proj.weight[:, cols])
    if has_bias:
        c_proj.bias.copy_(attn.c_proj.bias)
    attn.c_attn, attn.c_proj = c_attn, c_proj


@torch.no_grad()
def zero_heads(attn: CausalSelfAttention, heads: list[int]) -> None:
    """Silence ``heads`` in the full layer: their columns of c_proj set to zero."""
    attn.c_proj.weight[:, head_rows(attn, heads)[1]] = 0.0


PRUNED = {0: [1, 3], 1: [0, 1, 2]}  # heads removed per layer (layer 1 keeps one head)


@torch.no_grad()
def check_pruning(transform: Callable[[GPT], GPT]) -> None:
    """A layer sliced down to its kept heads computes what the full layer computes with the removed
    heads' outputs zeroed, layer by layer and through the whole model."""
    full, pruned = tiny_model(seed=3), transform(tiny_model(seed=3))
    x = torch.randn(2, 9, full.config.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for layer, removed in PRUNED.items():
        keep_heads(pruned.blocks[layer].attn, [h for h in range(full.config.n_head) if h not in removed])
        zero_heads(full.blocks[layer].attn, removed)
        assert pruned.blocks[layer].attn.n_head == full.config.n_head - len(removed)
        a, b = pruned.blocks[layer].attn(x), full.blocks[layer].attn(x)
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"layer {layer}: pruned heads != zeroed heads"
    idx, mask = tokens(), padding_mask([9, 5, 2], 9, "left")
    assert torch.allclose(pruned(idx, attention_mask=mask), full(idx, attention_mask=mask), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def check_shards(transform: Callable[[GPT], GPT]) -> None:
    """Tensor parallelism by heads: two shards each holding half the heads (c_attn rows, c_proj
    columns), their outputs summed plus c_proj's bias once, equal the full layer."""
    full = tiny_model(seed=4)
    x = torch.randn(2, 9, full.config.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for attn in transform(copy.deepcopy(full)).blocks:
        shards = [copy.deepcopy(attn) for _ in range(2)]
        keep_heads(shards[0], [0, 1], proj_bias=False)
        keep_heads(shards[1], [2, 3], proj_bias=False)
        assert [s.n_head for s in shards] == [2, 2]
        summed = shards[0](x) + shards[1](x) + attn.c_proj.bias
        assert torch.allclose(summed, full.blocks[attn.layer].attn(x), rtol=1e-12, atol=1e-12), "shards != layer"


def _blocks_attn(model: GPT) -> GPT:
    """The model's attention layers stand in for its blocks in ``check_shards``."""
    model.blocks = nn.ModuleList(block.attn for block in model.blocks)
    return model


def test_each_attention_layer_reads_its_head_count_from_its_projection():
    model = tiny_model()
    keep_heads(model.blocks[0].attn, [2])
    assert [block.attn.n_head for block in model.blocks] == [1, 4]


def test_pruned_heads_equal_the_full_model_with_those_heads_zeroed():
    check_pruning(lambda model: model)


def test_the_pruning_check_rejects_a_layer_that_counts_heads_from_the_config():
    with pytest.raises(AssertionError, match="pruned heads != zeroed heads"):
        check_pruning(with_heads_from_config)


def test_two_shards_of_heads_summed_through_c_proj_equal_the_full_layer():
    check_shards(_blocks_attn)


def test_the_shard_check_rejects_a_layer_that_counts_heads_from_the_config():
    with pytest.raises(AssertionError, match="shards != layer"):
        check_shards(lambda model: _blocks_attn(with_heads_from_config(model)))


# --- untied embeddings ------------------------------------------------------------------------------

def check_untied(model: GPT) -> None:
    """An untied model keeps a head of its own: a separate parameter, both in the state dict, both
    counted, each trained by its own gradient."""
    assert model.lm_head.weight is not model.wte.weight, "the head shares the embedding's parameter"
    state = model.state_dict()
    assert not torch.equal(state["lm_head.weight"], state["wte.weight"]), "the head holds the embedding's values"
    per_matrix = model.config.vocab_size * model.config.n_embd
    tied = GPT(GPTConfig(**{**model.config.to_dict(), "tie_embeddings": True}))
    assert model.num_params() == tied.num_params() + per_matrix, "num_params counts the head once"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = tokens()
    # a token never in the input: its embedding row gets no gradient, its head row does
    idx[idx == 0] = 1
    lm_loss(model(idx), tokens(seed=7)).backward()
    assert model.wte.weight.grad[0].abs().max() == 0 and model.lm_head.weight.grad[0].abs().max() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for name in ("wte.weight", "lm_head.weight"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), f"{name} did not train"


def test_an_untied_head_is_its_own_parameter_counted_saved_and_trained():
    check_untied(tiny_model(tie_embeddings=False).train())


def test_the_untied_check_rejects_a_model_that_ties_anyway():
    model = tiny_model(tie_embeddings=False).train()
    model.lm_head.weight = model.wte.weight
    with pytest.raises(AssertionError, match="shares the embedding"):
        check_untied(model)


@torch.no_grad()
def test_an_untied_model_loads_strictly_and_equals_hf_with_untied_embeddings():
    model, idx = tiny_model(tie_embeddings=False), tokens()
    config, state = model.config.to_dict(), model.state_dict()
    assert torch.equal(GPT.from_state(config, state)(idx), model(idx))
    hf = hf_gpt2.to_hf(model)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    assert torch.allclose(hf(idx).logits, model(idx), rtol=1e-10, atol=1e-10)
    # the same weights tied (the head read from wte) are another function: the comparison can fail
    assert not torch.allclose(model.lm_head(model.ln_f(model.hidden_states(idx)[-1])),
                              model.ln_f(model.hidden_states(idx)[-1]) @ model.wte.weight.t(), atol=1e-3)
    without_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="lm_head.weight"):
        GPT.from_state(config, without_head)


# --- strict loading ---------------------------------------------------------------------------------

def lenient_load(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Mutant: the loader before issue 8 (``strict=False``, only the tied head excused)."""
    missing, _ = model.load_state_dict(state, strict=False)
    assert not [n for n in missing if n != "lm_head.weight"]


def check_refuses_lora_key(load: Callable[[nn.Module, dict], None]) -> None:
    """A state with an extra LoRA weight must be refused with the key named, not silently dropped."""
    model = tiny_model()
    state = {**model.state_dict(), "blocks.0.attn.c_attn.lora_A": torch.zeros(2, 16, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.attn.c_attn.lora_A'\]"):
        load(tiny_model(seed=1), state)


def test_a_state_with_a_lora_weight_the_model_lacks_is_refused_naming_the_key():
    check_refuses_lora_key(lambda model, state: GPT.from_state(model.config.to_dict(), state))


def test_the_lora_key_check_rejects_the_old_lenient_loader():
    with pytest.raises(pytest.fail.Exception):
        check_refuses_lora_key(lenient_load)


def test_a_missing_weight_is_refused_naming_every_missing_key():
    state = tiny_model().state_dict()
    del state["blocks.1.mlp.c_fc.weight"], state["ln_f.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.c_fc.weight', 'ln_f.bias'\]"):
        GPT.from_state(tiny_config().to_dict(), state)


@torch.no_grad()
def test_a_tied_head_may_be_missing_and_still_reads_the_embedding():
    model, idx = tiny_model(), tokens()
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    loaded = GPT.from_state(model.config.to_dict(), state)
    assert loaded.lm_head.weight is loaded.wte.weight and torch.equal(loaded(idx), model(idx))


def test_allow_missing_excuses_exactly_the_named_keys():
    state = tiny_model().state_dict()
    del state["blocks.0.attn.c_attn.weight"], state["blocks.0.attn.c_attn.bias"]
    GPT.from_state(tiny_config().to_dict(), state, allow_missing=("blocks.0.attn.c_attn.weight",
                                                                  "blocks.0.attn.c_attn.bias"))
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.c_attn.bias'\]"):
        GPT.from_state(tiny_config().to_dict(), state, allow_missing=("blocks.0.attn.c_attn.weight",))
    extra = {**tiny_model().state_dict(), "blocks.0.attn.c_attn.lora_B": torch.zeros(1)}
    with pytest.raises(ValueError, match="lora_B"):  # allow_missing excuses nothing unexpected
        GPT.from_state(tiny_config().to_dict(), extra, allow_missing=("blocks.0.attn.c_attn.lora_B",))


# --- resizing the vocabulary ------------------------------------------------------------------------

NEW_VOCAB = VOCAB + 5


def check_resize(resize: Callable[[GPT, int, torch.Generator], None], tie: bool) -> None:
    """After ``resize(model, NEW_VOCAB, generator)``: old rows and old tokens' logits unchanged (the
    new columns are the new head rows against the same final state), the tie kept or the head
    resized too, new rows finite and near the old mean, and a state-dict round trip exact."""
    model, idx = tiny_model(tie_embeddings=tie), tokens()
    old_wte, old_head = model.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()
    with torch.no_grad():
        old_logits = model(idx)
        resize(model, NEW_VOCAB, torch.Generator().manual_seed(0))
        new_logits = model(idx)
    wte, head = model.wte.weight, model.lm_head.weight
    assert wte.shape == head.shape == (NEW_VOCAB, model.config.n_embd) and model.config.vocab_size == NEW_VOCAB
    assert (head is wte) == tie, "tie lost" if tie else "untied head now shares the embedding"
    assert torch.equal(wte[:VOCAB], old_wte) and torch.equal(head[:VOCAB], old_head), "old rows changed"
    assert torch.allclose(new_logits[..., :VOCAB], old_logits, rtol=1e-12, atol=1e-12), "old tokens' logits changed"
    final = model.ln_f(model.hidden_states(idx)[-1])
    assert torch.allclose(new_logits[..., VOCAB:], final @ head[VOCAB:].t(), rtol=1e-12, atol=1e-12)
    for name, old, new in (("wte", old_wte, wte), ("lm_head", old_head, head)):
        new_rows = new[VOCAB:].detach()
        assert torch.isfinite(new_rows).all()
        typical = (old - old.mean(dim=0)).norm(dim=1).median()
        assert (new_rows - old.mean(dim=0)).norm(dim=1).max() < 0.5 * typical, f"new {name} rows far from the mean"
    loaded = GPT.from_state(model.config.to_dict(), model.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(idx), new_logits), "state-dict round trip"


def _resize(model: GPT, n: int, generator: torch.Generator) -> None:
    model.resize_token_embeddings(n, generator)


def _resize_untied_by_retying(model: GPT, n: int, generator: torch.Generator) -> None:
    """Mutant: the head re-pointed at the resized embedding whatever the config says."""
    model.resize_token_embeddings(n, generator)
    model.lm_head.weight = model.wte.weight


def _resize_random_new_rows(model: GPT, n: int, generator: torch.Generator) -> None:
    """Mutant: new rows drawn like fresh initialisation (a random direction, not near the mean)."""
    model.resize_token_embeddings(n, generator)
    with torch.no_grad():
        model.wte.weight[VOCAB:] = 0.02 * torch.randn(n - VOCAB, model.config.n_embd, generator=generator)


def _resize_reinitialised(model: GPT, n: int, generator: torch.Generator) -> None:
    """Mutant: every row re-drawn, the old ones too."""
    model.resize_token_embeddings(n, generator)
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 0.02, generator=generator)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_resizing_keeps_old_rows_and_logits_adds_rows_near_the_mean_and_round_trips(tie):
    check_resize(_resize, tie)


@pytest.mark.parametrize(("mutant", "tie", "message"), [
    (_resize_untied_by_retying, False, "shares the embedding"),
    (_resize_random_new_rows, True, "far from the mean"),
    (_resize_reinitialised, True, "old rows changed"),
])
def test_the_resize_check_rejects_broken_resizes(mutant, tie, message):
    with pytest.raises(AssertionError, match=message):
        check_resize(mutant, tie)


def test_resizing_is_deterministic_given_the_generator_and_the_new_rows_train():
    a, b = tiny_model(), tiny_model()
    a.resize_token_embeddings(NEW_VOCAB, torch.Generator().manual_seed(5))
    b.resize_token_embeddings(NEW_VOCAB, torch.Generator().manual_seed(5))
    assert torch.equal(a.wte.weight, b.wte.weight)
    a.train()
    lm_loss(a(tokens(vocab=NEW_VOCAB)), tokens(seed=3, vocab=NEW_VOCAB)).backward()
    assert any(p is a.wte.weight for p in a.parameters()) and a.wte.weight.grad[VOCAB:].abs().max() > 0


def test_resizing_keeps_the_model_on_its_device():
    # "meta" stands for any device but the CPU (a GPU): the new rows must be made where the old live
    model = GPT(tiny_config()).to("meta")
    model.resize_token_embeddings(NEW_VOCAB, torch.Generator().manual_seed(0))
    assert model.wte.weight.device.type == "meta" and model.wte.weight.shape == (NEW_VOCAB, 16)
    assert model.lm_head.weight is model.wte.weight
