"""Peer for project 28: llama.cpp's OpenAI-compatible server (PyPI ``llama-cpp-python[server]``) on our weights.

llama.cpp is what people run on a CPU. Our GPT is GPT-2's architecture (learned positions, pre-LayerNorm,
tanh-GELU MLP, fused qkv, tied head), which llama.cpp implements as arch ``gpt2``, so the weights convert
without any change of meaning: every ``nn.Linear`` weight is already (out, in), the layout ggml wants (HF's
GPT-2 stores Conv1D (in, out) and its converter transposes; ours must not). A model without biases gets zero
biases (llama.cpp's gpt2 graph requires them), and the tied head is written out as ``output.weight``.

The tokenizer goes in as a GPT-2-style byte-level BPE: each token's bytes spelled with GPT-2's
byte-to-unicode table, the merges as ``"left right"`` in rank order (the same greedy lowest-rank-first
merging as ours), the split regex llama.cpp calls ``llama-bpe`` (the cl100k pattern our ``gpt4`` pattern
is), and the chat special tokens as control tokens, ``<|end|>`` as end of sequence.

Two halves, because the two run in different environments: ``export`` (our venv: torch, the zoo) writes the
tensors to an ``.npz`` and the tokenizer to JSON; ``write_gguf`` (any Python with ``gguf`` and numpy, e.g.
the llama-cpp-python venv) writes the GGUF file. ``python reference/llama_cpp_server.py NPZ JSON OUT.gguf``
runs the second half.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes: printable Latin-1 bytes stand for themselves, the others
    are shifted to code points from 256 up, so every byte string is a string without spaces or controls."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def export(model_name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Our model (zoo name or directory) as ``weights.npz`` (ggml tensor names) and ``tokenizer.json``."""
    import numpy as np
    import torch

    from impl.zoo import load_any

    model, tokenizer, _ = load_any(model_name)
    cfg = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def get(name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name in state:
            return state[name].numpy()
        return torch.zeros(shape).numpy()  # bias-free model: llama.cpp's gpt2 graph adds zero biases

    e = cfg.n_embd
    tensors = {"token_embd.weight": get("wte.weight"), "position_embd.weight": get("wpe.weight"),
               "output_norm.weight": get("ln_f.weight"), "output_norm.bias": get("ln_f.bias", (e,)),
               "output.weight": get("lm_head.weight")}
    for i in range(cfg.n_layer):
        p, q = f"blocks.{i}.", f"blk.{i}."
        hidden = state[p + "mlp.c_fc.weight"].shape[0]
        for ours, theirs, width in (("ln_1", "attn_norm", e), ("attn.c_attn", "attn_qkv", 3 * e),
                                    ("attn.c_proj", "attn_output", e), ("ln_2", "ffn_norm", e),
                                    ("mlp.c_fc", "ffn_up", hidden), ("mlp.c_proj", "ffn_down", e)):
            tensors[q + theirs + ".weight"] = get(p + ours + ".weight")
            tensors[q + theirs + ".bias"] = get(p + ours + ".bias", (width,))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "weights.npz", **tensors)
    specials = dict(tokenizer.special_tokens)
    meta = {"n_ctx": cfg.block_size, "n_embd": e, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_ff": int(tensors["blk.0.ffn_up.weight"].shape[0]), "eps": 1e-5,
            "merges": [list(m) for m in tokenizer.merges],
            "token_bytes": [list(tokenizer.token_bytes(i)) for i in range(256 + len(tokenizer.merges))],
            "specials": specials, "end_id": specials.get("<|end|>", specials.get("<|endoftext|>")),
            "pattern": tokenizer.pattern_name,
            "name": Path(str(model_name)).name}
    (out / "tokenizer.json").write_text(json.dumps(meta))
    return out / "weights.npz", out / "tokenizer.json"


def write_gguf(npz: str | Path, meta_json: str | Path, out: str | Path) -> Path:
    """The GGUF file (f32) llama.cpp loads, from ``export``'s two files. Raises when the vocabulary has two
    tokens with the same bytes (llama.cpp's vocabulary is keyed by the string: it could not tell them apart)."""
    import gguf
    import numpy as np

    meta = json.loads(Path(meta_json).read_text())
    if meta["pattern"] != "gpt4":
        raise ValueError("only the gpt4 (cl100k) split pattern maps to a llama.cpp pre-tokenizer, "
                         f"got {meta['pattern']}")
    spell = bytes_to_unicode()
    tokens = ["".join(spell[b] for b in bs) for bs in meta["token_bytes"]]
    if len(set(tokens)) != len(tokens):
        raise ValueError("two token ids have the same bytes: llama.cpp's vocabulary cannot hold them")
    merges = [f"{tokens[a]} {tokens[b]}" for a, b in meta["merges"]]
    specials = sorted(meta["specials"].items(), key=lambda kv: kv[1])
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for name, i in specials:
        assert i == len(tokens), "special token ids follow the merges"
        tokens.append(name)
        types.append(gguf.TokenType.CONTROL)

    w = gguf.GGUFWriter(str(out), "gpt2")
    w.add_name(meta["name"])
    w.add_context_length(meta["n_ctx"])
    w.add_embedding_length(meta["n_embd"])
    w.add_feed_forward_length(meta["n_ff"])
    w.add_block_count(meta["n_layer"])
    w.add_head_count(meta["n_head"])
    w.add_layer_norm_eps(meta["eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if meta["end_id"] is not None:
        w.add_eos_token_id(meta["end_id"])
    w.add_add_bos_token(False)
    with np.load(npz) as tensors:
        for name in tensors.files:
            w.add_tensor(name, tensors[name].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(python: str, gguf_path: str | Path, port: int, threads: int, n_ctx: int, alias: str) -> list[str]:
    """``python -m llama_cpp.server`` on loopback: one model, ``threads`` CPU threads, the model's context."""
    return [python, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
            "--model_alias", alias, "--n_gpu_layers", "0"]


def llama_python() -> str | None:
    """An interpreter that can import ``llama_cpp.server`` and ``gguf``: $HANDSON_LLAMA_CPP_PYTHON, else this
    one (``pip install -e ".[llama]"``); None when there is none."""
    import os

    for python in (os.environ.get("HANDSON_LLAMA_CPP_PYTHON"), sys.executable):
        if python and Path(python).exists():
            ok = subprocess.run([python, "-c", "import llama_cpp.server, gguf"], capture_output=True)
            if ok.returncode == 0:
                return python
    return None


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python reference/llama_cpp_server.py WEIGHTS.npz TOKENIZER.json OUT.gguf")
    print(write_gguf(*sys.argv[1:]))
