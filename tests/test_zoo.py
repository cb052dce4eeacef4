"""The zoo: a named recipe is built once into the cache and then loaded; an entry built from another
recipe or other code is stale and rebuilt, a corrupt one is rebuilt, never loaded; ``list`` says which."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import impl.zoo
from impl import model_cache, zoo
from impl.gpt.model import GPTConfig
from impl.train.loop import TrainConfig
from impl.zoo import catalog, recipes
from impl.zoo.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30


def tiny_recipe(tmp_path: Path, max_iters: int = 4) -> recipes.Recipe:
    """A recipe that trains in well under a second: 1 layer x 16 on a small text with a 290-id BPE."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(TEXT, encoding="utf-8")
    vocab = 256 + 28 + len(catalog.SPECIAL_TOKENS)
    model = GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, bias=False)
    train = TrainConfig(max_iters=max_iters, lr_decay_iters=max_iters, batch_size=2, block_size=16, warmup_iters=1,
                        eval_interval=2, eval_iters=1)
    return recipes.Recipe("tiny-zoo", "a test recipe", str(corpus),
                          {"kind": "bpe", "vocab_size": vocab, "pattern": "gpt4",
                           "special_tokens": list(catalog.SPECIAL_TOKENS)}, model, train)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """An empty cache in tmp_path with the tiny recipe registered; yields (recipe, list of builds)."""
    monkeypatch.setenv("HANDSON_CACHE", str(tmp_path / "cache"))
    builds: list[str] = []
    real_build = recipes.build

    def counting_build(recipe, progress=True):
        builds.append(recipe.name)
        return real_build(recipe, progress=False)

    monkeypatch.setattr(impl.zoo, "build", counting_build)
    recipe = tiny_recipe(tmp_path)
    zoo.register_recipe(recipe, replace=True)
    yield recipe, builds
    model_cache._REGISTRY.pop("tiny-zoo", None)


def test_a_second_load_returns_the_cached_model_without_training(tiny):
    recipe, builds = tiny
    first, tok, meta = zoo.load("tiny-zoo")
    second, _, _ = zoo.load("tiny-zoo")
    assert builds == ["tiny-zoo"]
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert meta["cache_key"] == recipes.cache_key(recipe)
    assert model_cache.state("tiny-zoo") == "cached"


def test_the_metadata_holds_the_tokenizer_figures_and_loss_curve(tiny):
    recipe, _ = tiny
    model, tok, meta = zoo.load("tiny-zoo")
    assert tok.vocab_size == model.config.vocab_size == recipe.model.vocab_size
    assert tok.decode(tok.encode("To be, or not")) == "To be, or not"
    assert list(tok.special_tokens) == list(catalog.SPECIAL_TOKENS)
    assert meta["special_token_ids"] == tok.special_tokens
    assert tok.encode("<|user|>hi<|end|>", allowed_special="all")[0] == tok.special_tokens["<|user|>"]
    assert [row["iter"] for row in meta["loss_curve"]] == [0, 2, 4]
    assert meta["heldout_bits_per_byte"] > 0 and meta["train_wall_s"] >= 0 and meta["tokens_per_s"] > 0
    assert meta["heldout"]["bits_per_byte"] == pytest.approx(meta["heldout_bits_per_byte"], rel=1e-5)
    assert meta["wikitext2_test"]["status"].startswith("not evaluated")


def test_the_build_is_deterministic(tiny, tmp_path):
    recipe, _ = tiny
    a, meta_a = recipes.build(recipe, progress=False)
    b, meta_b = recipes.build(recipe, progress=False)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert meta_a["heldout_bits_per_byte"] == meta_b["heldout_bits_per_byte"]


def test_a_changed_recipe_makes_the_entry_stale_and_it_is_rebuilt(tiny, tmp_path):
    recipe, builds = tiny
    zoo.load("tiny-zoo")
    changed = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_iters=6, lr_decay_iters=6))
    assert recipes.cache_key(changed) != recipes.cache_key(recipe)
    zoo.register_recipe(changed, replace=True)
    assert model_cache.state("tiny-zoo") == "stale"
    _, _, meta = zoo.load("tiny-zoo")
    assert builds == ["tiny-zoo", "tiny-zoo"]
    assert meta["cache_key"] == recipes.cache_key(changed) and meta["train_config"]["max_iters"] == 6
    assert model_cache.state("tiny-zoo") == "cached"
    assert not list(model_cache.models_dir().glob("tiny-zoo.stale-*")), "the stale entry is removed once replaced"


def test_changed_training_code_makes_the_entry_stale(tiny, tmp_path, monkeypatch):
    recipe, builds = tiny
    source = tmp_path / "loop_stand_in.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(recipes, "CODE_FILES", (*recipes.CODE_FILES, str(source)))
    zoo.load("tiny-zoo")
    source.write_text("x = 2\n")
    assert model_cache.state("tiny-zoo") == "stale"
    zoo.load("tiny-zoo")
    assert builds == ["tiny-zoo", "tiny-zoo"]


def test_a_changed_corpus_makes_the_entry_stale(tiny, tmp_path):
    recipe, builds = tiny
    zoo.load("tiny-zoo")
    Path(recipe.corpus).write_text(TEXT + "Ay, there's the rub.\n", encoding="utf-8")
    assert model_cache.state("tiny-zoo") == "stale"


def test_a_corrupt_entry_is_rebuilt_never_loaded(tiny, capsys):
    _, builds = tiny
    zoo.load("tiny-zoo")
    weights = model_cache.entry_dir("tiny-zoo") / model_cache.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_cache.state("tiny-zoo").startswith("corrupt")
    zoo.load("tiny-zoo")
    assert builds == ["tiny-zoo", "tiny-zoo"]
    assert "is corrupt" in capsys.readouterr().err
    assert model_cache.state("tiny-zoo") == "cached"


def test_list_shows_each_state_and_the_figures(tiny, capsys):
    recipe, _ = tiny
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-zoo" in out and "absent" in out
    for name in ("char", "bpe-small", "bpe-base"):
        assert name in out
    zoo.load("tiny-zoo")
    cli(["list"])
    out = capsys.readouterr().out
    line = out[out.index("tiny-zoo"):]
    assert "cached" in line.splitlines()[0] and "bits/byte" in line.splitlines()[1]
    zoo.register_recipe(dataclasses.replace(recipe, val_fraction=0.2), replace=True)
    cli(["list"])
    assert "stale" in capsys.readouterr().out.split("tiny-zoo")[1].splitlines()[0]


def test_build_reports_built_then_already_cached(tiny, capsys):
    _, builds = tiny
    assert cli(["build", "tiny-zoo"]) == 0
    assert "tiny-zoo: built" in capsys.readouterr().out
    assert cli(["build", "tiny-zoo"]) == 0
    assert "was already cached" in capsys.readouterr().out
    assert builds == ["tiny-zoo"]


def test_the_named_recipes_are_registered_with_the_chat_tokens_reserved():
    for name in ("char", "bpe-small", "bpe-base"):
        assert model_cache.registered()[name].key is not None
    for name in ("bpe-small", "bpe-base"):
        specials = catalog.RECIPES[name].tokenizer["special_tokens"]
        assert specials[0] == "<|endoftext|>"
        assert {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"} <= set(specials)
    keys = {name: recipes.cache_key(r) for name, r in catalog.RECIPES.items()}
    assert len(set(keys.values())) == len(catalog.RECIPES)
    assert keys["bpe-base"] == recipes.cache_key(catalog.RECIPES["bpe-base"])


@pytest.mark.parametrize("module", ["impl.zoo", "impl.model_cache"])
def test_both_module_names_run_the_one_cli(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "list" in done.stdout and "build NAME" in done.stdout and "verify" in done.stdout
