"""Faults during training lose nothing: a run killed at any moment (even while a checkpoint is being
written) resumes to the same weights and loss curve, bit for bit, and a corrupt checkpoint is never
loaded: one line says so, the file is moved aside and training starts again from iteration 0."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import impl.train.loop
from impl.gpt.model import GPT, GPTConfig
from impl.train.checkpoint import CheckpointCorrupt, load_checkpoint, read_meta, save_checkpoint
from impl.train.loop import TrainConfig, train
from impl.train.tracking import MetricsLog, read_metrics

ROOT = Path(__file__).resolve().parents[1]
MAX_ITERS, EVAL_INTERVAL = 200, 10
CLI_ARGS = ["--max-iters", str(MAX_ITERS), "--eval-interval", str(EVAL_INTERVAL), "--eval-iters", "1",
            "--log-interval", "1", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32",
            "--batch-size", "8", "--warmup-iters", "20", "--lr-decay-iters", str(MAX_ITERS)]


# --- a real training process, killed and resumed ---------------------------------------------------

def _corpus(tmp_path: Path) -> Path:
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(20000)))
    return path


def _launch(corpus: Path, out: Path, log: Path, resume: bool) -> subprocess.Popen:
    """``python -m impl.char_gpt train`` on one thread (bit-exact runs need the same thread count)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HANDSON_CACHE": str(out.parent / "cache")}
    cmd = [sys.executable, "-m", "impl.char_gpt", "train", "--corpus", str(corpus), "--out", str(out), *CLI_ARGS]
    with open(log, "a") as sink:  # a file, not a pipe: a full pipe would block the trainer
        return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc``; True when it was still running (the kill interrupted something)."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def _kill_mid_checkpoint(proc: subprocess.Popen, out: Path) -> bool:
    """Kill ``proc`` the moment a new ``last.safetensors.tmp`` appears after a first checkpoint
    exists; True when the temp file is still there after the kill (the write was cut short)."""
    tmp, last = out / "last.safetensors.tmp", out / "last.safetensors"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if last.exists() and tmp.exists():
            return _kill(proc) and tmp.exists()
    return False


def _kill_at_random(proc: subprocess.Popen, out: Path, started_ns: int, rng: random.Random) -> bool:
    """Wait until this process writes its log (training has begun), then kill it after a random delay."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.stat().st_mtime_ns > started_ns:
            break
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 1.0))
    return _kill(proc)


def _curve(out: Path) -> list[dict]:
    """The metric rows without wall-clock fields (they differ between any two runs)."""
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in read_metrics(out)]


def _assert_same_tensors(a: Path, b: Path) -> None:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), f"{a.name}: tensor {key} differs"


def test_training_killed_at_random_moments_and_mid_checkpoint_resumes_bit_exactly(tmp_path):
    corpus = _corpus(tmp_path)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    reference = _launch(corpus, clean, tmp_path / "clean.log", resume=False)  # runs beside the killed one
    rng = random.Random(18)
    torn_writes = interruptions = 0
    for attempt in range(4):  # the temp file may be renamed between our look and the kill: try again
        proc = _launch(corpus, killed, tmp_path / "killed.log", resume=attempt > 0)
        torn_writes += _kill_mid_checkpoint(proc, killed)
        interruptions += proc.returncode == -signal.SIGKILL
        if torn_writes:
            break
    for _ in range(3):
        started_ns = time.time_ns()
        proc = _launch(corpus, killed, tmp_path / "killed.log", resume=True)
        interruptions += _kill_at_random(proc, killed, started_ns, rng)
    proc = _launch(corpus, killed, tmp_path / "killed.log", resume=True)
    assert proc.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-2000:]
    assert reference.wait(timeout=300) == 0, (tmp_path / "clean.log").read_text()[-2000:]
    assert torn_writes == 1, "no kill landed while a checkpoint was being written"
    assert interruptions >= 3, f"only {interruptions} kills interrupted a running trainer"

    for name in ("last.safetensors", "best.safetensors"):
        _assert_same_tensors(clean / name, killed / name)
    assert read_meta(killed / "last.safetensors")["iter"] == MAX_ITERS
    curve = _curve(killed)
    assert [r["iter"] for r in curve if r["kind"] == "step"] == list(range(MAX_ITERS)), "gaps or duplicates"
    assert [r["iter"] for r in curve if r["kind"] == "eval"] == list(range(0, MAX_ITERS + 1, EVAL_INTERVAL))
    assert curve == _curve(clean), "the loss curve of the killed run differs from the clean run's"


# --- the same faults, in process -----------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    """Toy shapes: a second intra-op thread only adds synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(tmp_path: Path, **overrides) -> tuple[GPTConfig, TrainConfig, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = ((np.arange(400) * 7 + rng.integers(0, 3, 400)) % 23).astype(np.uint16)
    cfg = GPTConfig(vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=16)
    tc = TrainConfig(max_iters=12, batch_size=4, block_size=8, warmup_iters=2, lr_decay_iters=12,
                     eval_interval=4, eval_iters=1, log_interval=1, **overrides)
    return cfg, tc, ids


def _fresh_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def _clean_run(tmp_path: Path) -> Path:
    cfg, tc, ids = _tiny(tmp_path)
    train(_fresh_model(cfg), ids, ids, tc, tmp_path / "clean", progress=False)
    return tmp_path / "clean"


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _change_header_digit(path: Path) -> None:
    """Edit the JSON metadata so it stays valid JSON of the same length (a silent header corruption)."""
    data = path.read_bytes()
    at = data.index(b'"iter\\": ') + len(b'"iter\\": ')
    digit = data[at : at + 1]
    path.write_bytes(data[:at] + (b"7" if digit != b"7" else b"8") + data[at + 1 :])


CORRUPTIONS = {
    "bit flip in a tensor": lambda p: _flip_byte(p, 3),
    "edited metadata": _change_header_digit,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "zeros after a power cut": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_checkpoint_is_refused_in_one_line_and_leaves_the_model_untouched(tmp_path, corrupt):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    path = save_checkpoint(tmp_path / "c.safetensors", _fresh_model(cfg, 1), meta={"iter": 3})
    corrupt(path)
    model = _fresh_model(cfg, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointCorrupt) as info:
        load_checkpoint(path, model)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "corrupt" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a corrupt file was loaded"


def test_a_checkpoint_without_a_hash_is_refused(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"model.w": torch.zeros(3)}, str(path), metadata={"meta": "{}", "optim": "{}"})
    with pytest.raises(CheckpointCorrupt, match="carries no sha256"):
        load_checkpoint(path)


def test_a_checkpoint_write_fsyncs_the_data_before_the_rename(tmp_path):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    with patch("os.fsync", lambda fd: (events.append("fsync"), real_fsync(fd))), \
         patch("os.replace", lambda a, b: (events.append("replace"), real_replace(a, b))):
        save_checkpoint(tmp_path / "c.safetensors", GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=1, n_embd=8)))
    assert events[:2] == ["fsync", "replace"]


def test_resume_from_a_corrupt_last_checkpoint_moves_it_aside_and_retrains_from_zero(tmp_path, capfd):
    clean = _clean_run(tmp_path)
    cfg, tc, ids = _tiny(tmp_path)
    out = tmp_path / "run"
    train(_fresh_model(cfg), ids, ids, TrainConfig(**{**tc.__dict__, "stop_after": 9}), out, progress=False)
    _flip_byte(out / "last.safetensors", 5)
    capfd.readouterr()
    train(_fresh_model(cfg), ids, ids, tc, out, resume=True, progress=False)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.safetensors is corrupt" in err[0] and "starting from iteration 0" in err[0]
    aside = [p.name for p in out.iterdir() if p.name.startswith("last.safetensors.corrupt-")]
    assert len(aside) == 1, "the corrupt file is kept aside for inspection"
    _assert_same_tensors(clean / "last.safetensors", out / "last.safetensors")
    assert _curve(out) == _curve(clean), "the log restarts with the retrained run"


def test_resume_without_any_checkpoint_says_so_and_trains_from_zero(tmp_path, capfd):
    clean = _clean_run(tmp_path)
    cfg, tc, ids = _tiny(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    # the log of a run killed before its first checkpoint
    (out / "metrics.jsonl").write_text('{"kind": "eval", "iter": 0, "val_loss": 9.9}\n')
    train(_fresh_model(cfg), ids, ids, tc, out, resume=True, progress=False)
    assert "no checkpoint" in capfd.readouterr().err
    _assert_same_tensors(clean / "last.safetensors", out / "last.safetensors")
    assert _curve(out) == _curve(clean)


class _Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs, no handler catches it."""


def test_a_kill_between_the_best_and_last_checkpoints_loses_no_best(tmp_path):
    clean = _clean_run(tmp_path)
    history = read_meta(clean / "last.safetensors")["history"]
    improving = [row["iter"] for i, row in enumerate(history)
                 if i > 0 and row["val_loss"] < min(r["val_loss"] for r in history[:i])]
    assert improving, "the tiny run must improve after iteration 0 for this test to mean anything"
    kill_at = improving[-1]
    cfg, tc, ids = _tiny(tmp_path)
    out = tmp_path / "run"
    real_save = impl.train.loop.save_checkpoint
    saved_at_kill_iter = []

    def save_then_die_between_the_two(path, model, optimizer=None, rng=None, meta=None):
        if meta["iter"] == kill_at:
            if saved_at_kill_iter:
                raise _Killed  # one of the two files of this evaluation is written, the other is not
            saved_at_kill_iter.append(Path(path).name)
        return real_save(path, model, optimizer, rng, meta)

    with patch.object(impl.train.loop, "save_checkpoint", save_then_die_between_the_two), pytest.raises(_Killed):
        train(_fresh_model(cfg), ids, ids, tc, out, progress=False)
    train(_fresh_model(cfg), ids, ids, tc, out, resume=True, progress=False)
    for name in ("best.safetensors", "last.safetensors"):
        _assert_same_tensors(clean / name, out / name)
        assert read_meta(out / name)["iter"] == read_meta(clean / name)["iter"]


def test_the_log_reaches_the_disk_before_each_checkpoint(tmp_path):
    cfg, tc, ids = _tiny(tmp_path)
    events = []
    real_fsync, real_save = os.fsync, impl.train.loop.save_checkpoint

    def fsync(fd):
        events.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        return real_fsync(fd)

    def save(path, *args, **kwargs):
        events.append("save " + Path(path).name)
        return real_save(path, *args, **kwargs)

    with patch("os.fsync", fsync), patch.object(impl.train.loop, "save_checkpoint", save):
        train(_fresh_model(cfg), ids, ids, tc, tmp_path / "run", progress=False)
    saves = [i for i, e in enumerate(events) if e == "save last.safetensors"]
    starts = [0] + saves[:-1]
    assert len(saves) == 4 and all("metrics.jsonl" in events[a:b] for a, b in zip(starts, saves, strict=True))


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "eval", "iter": 0, "val_loss": 3.0}\n{"kind": "step", "iter": 0, "lo')
    log = MetricsLog(tmp_path, resume_iter=0)
    log.write({"kind": "step", "iter": 0, "loss": 2.5})
    log.close()
    assert read_metrics(tmp_path) == [{"kind": "eval", "iter": 0, "val_loss": 3.0},
                                      {"kind": "step", "iter": 0, "loss": 2.5}]


def test_a_fresh_run_replaces_the_log_of_an_earlier_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "iter": 5, "loss": 1.0}\n')
    log = MetricsLog(tmp_path)
    log.write({"kind": "step", "iter": 0, "loss": 2.0})
    log.close()
    assert read_metrics(tmp_path) == [{"kind": "step", "iter": 0, "loss": 2.0}]
