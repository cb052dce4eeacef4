"""The model cache builds each model once, even when two processes ask at the same moment; it never
shows a half-written entry, survives a builder killed mid-build, and never loads a corrupt entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from impl import model_cache
from impl.model_cache.__main__ import main as cli

ROOT = Path(__file__).resolve().parents[1]

# A process that registers a tiny builder (counting its builds in $BUILD_COUNT, sleeping $BUILD_SLEEP s
# while "training"), waits for the $GO file when given one, asks the cache for the model, and prints
# the sha256 of the weights it got.
CHILD = r"""
import hashlib, os, sys, time
from pathlib import Path
import torch
from impl import model_cache

def build():
    with open(os.environ["BUILD_COUNT"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(float(os.environ["BUILD_SLEEP"]))
    torch.manual_seed(0)
    return torch.nn.Linear(32, 16), {"shape": [32, 16]}

model_cache.register("tiny", build, make_model=lambda meta: torch.nn.Linear(*meta["shape"]))
if os.environ.get("GO"):
    Path(os.environ["GO"] + f".ready-{os.getpid()}").touch()
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.001)
model, meta = model_cache.get("tiny")
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest())
"""


def _tiny_build_in_process(counter: Path):
    def build():
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        torch.manual_seed(0)
        return torch.nn.Linear(32, 16), {"shape": [32, 16]}
    return build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache in tmp_path, the tiny model registered in this process too; yields the build counter."""
    monkeypatch.setenv("HANDSON_CACHE", str(tmp_path / "cache"))
    counter = tmp_path / "builds.txt"
    counter.touch()
    model_cache.register("tiny", _tiny_build_in_process(counter),
                         make_model=lambda meta: torch.nn.Linear(*meta["shape"]), replace=True)
    yield counter
    model_cache._REGISTRY.pop("tiny", None)


def _child(tmp_path: Path, counter: Path, sleep_s: float, go: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "BUILD_COUNT": str(counter), "BUILD_SLEEP": str(sleep_s),
           "OMP_NUM_THREADS": "1", "GO": str(go or "")}
    return subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _weights_hash(model: torch.nn.Module) -> str:
    import hashlib
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()


def _reference_hash() -> str:
    torch.manual_seed(0)
    return _weights_hash(torch.nn.Linear(32, 16))


def test_two_processes_asking_at_once_build_once_and_never_see_half_an_entry(cache, tmp_path):
    go = tmp_path / "go"
    procs = [_child(tmp_path, cache, sleep_s=2.0, go=go) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready-*"))) < 2:  # both imported torch: release them together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child died early"
        time.sleep(0.01)
    go.touch()
    entry, seen_building, seen_published = model_cache.entry_dir("tiny"), 0, 0
    while any(p.poll() is None for p in procs):
        seen_building += any(entry.parent.glob(".tiny.build-*"))
        if entry.exists():
            model_cache.verify("tiny")  # raises if the visible entry is incomplete
            seen_published += 1
        time.sleep(0.002)
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    assert len(cache.read_text().split()) == 1, "exactly one process built the model"
    assert outputs[0][0] == outputs[1][0] == _reference_hash() + "\n", "both got the built weights"
    # the non-builder waits on the lock; the builder may print it too, when it asked for the exclusive lock
    # while the other still held its brief shared one (CI saw that once): exactly one build is the property
    assert sum("waiting" in err for _, err in outputs) >= 1, "the other one waited on the lock"
    assert seen_building > 0 and seen_published > 0, "the poll watched the build and the publication"


def test_a_builder_killed_mid_build_leaves_no_entry_and_the_next_get_builds_it(cache, tmp_path):
    proc = _child(tmp_path, cache, sleep_s=600)
    deadline = time.monotonic() + 120
    while not cache.read_text():  # the builder is running (and holds the exclusive lock)
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close(), proc.stderr.close()
    models = model_cache.models_dir()
    assert not model_cache.entry_dir("tiny").exists(), "a killed build published nothing"
    assert list(models.glob(".tiny.build-*")), "the killed builder's private directory is left behind"
    model, meta = model_cache.get("tiny")  # would block forever if the dead builder's lock were held
    assert _weights_hash(model) == _reference_hash() and meta == {"shape": [32, 16]}
    assert len(cache.read_text().split()) == 2
    assert not list(models.glob(".tiny.build-*")), "the next build clears the dead one's leftovers"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "bit flip in the weights": lambda entry: _flip_last_byte(entry / model_cache.MODEL_FILE),
    "weights missing": lambda entry: (entry / model_cache.MODEL_FILE).unlink(),
    "manifest missing": lambda entry: (entry / model_cache.MANIFEST_FILE).unlink(),
    "manifest torn": lambda entry: (entry / model_cache.MANIFEST_FILE).write_text('{"files": {"mod'),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_entry_is_reported_in_one_line_moved_aside_and_rebuilt(cache, capfd, corrupt):
    model_cache.get("tiny")
    entry = model_cache.entry_dir("tiny")
    corrupt(entry)
    assert model_cache.state("tiny").startswith("corrupt")
    capfd.readouterr()
    model, _ = model_cache.get("tiny")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is corrupt" in err[0] and "rebuilding 'tiny'" in err[0]
    assert _weights_hash(model) == _reference_hash(), "the rebuilt model is loaded, not the corrupt one"
    assert len(cache.read_text().split()) == 2
    assert len(list(entry.parent.glob("tiny.corrupt-*"))) == 1
    assert model_cache.state("tiny") == "cached"


def test_a_cached_model_is_loaded_without_building_again(cache):
    first, _ = model_cache.get("tiny")
    second, _ = model_cache.get("tiny")
    assert len(cache.read_text().split()) == 1
    assert _weights_hash(first) == _weights_hash(second)
    manifest = json.loads((model_cache.entry_dir("tiny") / model_cache.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {model_cache.MODEL_FILE}


def test_an_unregistered_name_lists_the_registered_ones(cache):
    with pytest.raises(KeyError, match="no model named 'nope'.*char.*tiny"):
        model_cache.get("nope")


def test_names_that_are_not_plain_directory_names_are_refused():
    with pytest.raises(ValueError, match="must match"):
        model_cache.register("../escape", lambda: (torch.nn.Linear(1, 1), {}))


def test_cli_verify_reports_a_corrupt_entry_and_fails(cache, capsys):
    model_cache.get("tiny")
    assert cli(["verify"]) == 0 and "tiny: cached" in capsys.readouterr().out
    _flip_last_byte(model_cache.entry_dir("tiny") / model_cache.MODEL_FILE)
    bad = subprocess.run([sys.executable, "-m", "impl.model_cache", "verify"], cwd=ROOT, capture_output=True,
                         text=True, env=os.environ.copy())  # the real entry point, once
    assert bad.returncode == 1 and "tiny: corrupt" in bad.stdout and "moves a corrupt entry aside" in bad.stderr
    assert cli(["list"]) == 0
    listing = capsys.readouterr().out
    assert "char" in listing and "absent" in listing and "tiny" in listing and "corrupt" in listing
    with pytest.raises(SystemExit) as exit_info:
        cli(["build", "nope"])
    err = capsys.readouterr().err
    named = err.partition("(registered: ")[2]
    assert exit_info.value.code == 2 and all(n in named for n in ("bpe-base", "bpe-small", "char", "tiny"))


def test_an_entry_built_under_another_key_is_stale_and_rebuilt_never_loaded(cache, capsys):
    key = {"now": "recipe-and-code-1"}
    model_cache.register("tiny", _tiny_build_in_process(cache), make_model=lambda meta: torch.nn.Linear(*meta["shape"]),
                         replace=True, key=lambda: key["now"])
    _, meta = model_cache.get("tiny")
    assert meta[model_cache.KEY_FIELD] == "recipe-and-code-1" and model_cache.state("tiny") == "cached"
    key["now"] = "recipe-and-code-2"
    assert model_cache.state("tiny") == "stale"
    _, meta = model_cache.get("tiny")
    assert len(cache.read_text().split()) == 2, "the stale entry was rebuilt"
    assert meta[model_cache.KEY_FIELD] == "recipe-and-code-2" and model_cache.state("tiny") == "cached"
    assert "is stale" in capsys.readouterr().err
    assert model_cache.entries_on_disk() == ["tiny"]
