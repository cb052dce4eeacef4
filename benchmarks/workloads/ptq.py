"""Project 14 claims, measured on ``bpe-base`` (6 x 256, vocab 4096, tied embedding / LM head): model bytes on
disk and in memory, held-out perplexity of int8 / int4 round-to-nearest (RTN) and GPTQ, LLM.int8() and
bitsandbytes' layers, and CPU speed of each. Perplexities are measured on the same held-out windows for every
variant (quick: the first 16 windows of 256 tokens; full: 128), calibration on windows of the TRAIN split.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
from pathlib import Path

import torch

from harness.measure import Context, MeasurementError, Plot, Result, interleaved, peak_memory_bytes
from impl import zoo
from impl.ptq import modules
from impl.ptq.calibration import calibration_batches
from impl.ptq.gptq import gptq_model
from impl.ptq.llm_int8 import llm_int8_model
from impl.ptq.quant import Scheme
from impl.train.evaluate import full_split_loss

MODEL = "bpe-base"
INT8 = Scheme(8)  # per output channel, symmetric
INT4 = Scheme(4, 128, symmetric=False)  # GPTQ's usual g128, asymmetric (min-max) grid
MIB = 2**20


@functools.lru_cache(maxsize=1)
def _base() -> tuple[torch.nn.Module, dict, torch.Tensor, object]:
    model, tokenizer, meta = zoo.load(MODEL)
    train_ids, val_ids = zoo.token_splits(tokenizer, meta)
    return model.eval(), meta, train_ids, val_ids


def _held_out(quick: bool):
    block = _base()[0].config.block_size
    return _base()[3][: (16 if quick else 128) * block + 1]


def _calibration(quick: bool) -> torch.Tensor:
    return calibration_batches(_base()[2], n_samples=32 if quick else 128, seq_len=256, seed=0)


@functools.lru_cache(maxsize=64)
def _perplexity(variant: str, quick: bool) -> float:
    with torch.no_grad():
        return math.exp(full_split_loss(_variant(variant, quick), _held_out(quick)))


def _rtn(scheme: Scheme, lm_head: bool) -> torch.nn.Module:
    model = copy.deepcopy(_base()[0])
    modules.quantize_model(model, scheme, lm_head=lm_head)
    return model.eval()


@functools.lru_cache(maxsize=16)
def _gptq_codes(bits: int, group_size: int | None, act_order: bool, lm_head: bool, quick: bool):
    errors: dict = {}
    codes = gptq_model(_base()[0], _calibration(quick), Scheme(bits, group_size, False), act_order=act_order,
                       lm_head=lm_head, errors=errors)
    return codes, errors


def _gptq(bits: int, group_size: int | None, act_order: bool, lm_head: bool, quick: bool) -> torch.nn.Module:
    model = copy.deepcopy(_base()[0])
    codes, _ = _gptq_codes(bits, group_size, act_order, lm_head, quick)
    modules.quantize_model(model, Scheme(bits, group_size, False), lm_head=lm_head, weights=codes)
    return model.eval()


def _variant(name: str, quick: bool) -> torch.nn.Module:
    """The model a variant name stands for (see VARIANTS)."""
    head = name.endswith("+head")
    base = name.removesuffix("+head")
    if base == "fp32":
        return _base()[0]
    if base == "int8 rtn":
        return _rtn(INT8, head)
    if base == "int8 w8a8":
        model = _rtn(INT8, head)
        modules.use_int8_matmul(model)
        return model
    if base == "llm.int8":
        model = copy.deepcopy(_base()[0])
        llm_int8_model(model)
        return model.eval()
    if base.startswith("int4 rtn"):
        return _rtn(_scheme4(base), head)
    if base.startswith("int4 gptq"):
        s = _scheme4(base)
        return _gptq(4, s.group_size, "no-act-order" not in base, head, quick)
    if base.startswith("bnb "):
        from reference import bnb_int8

        model = copy.deepcopy(_base()[0])
        bnb_int8.quantize_model(model, base.split()[1])
        return model.eval()
    raise ValueError(f"unknown variant {name!r}")


def _scheme4(name: str) -> Scheme:
    group = next((int(p[1:]) for p in name.split() if p.startswith("g") and p[1:].isdigit()), None)
    return Scheme(4, group, False)


def _ratio_to_fp32(variant: str, ctx: Context) -> tuple[float, float, float]:
    fp, q = _perplexity("fp32", ctx.quick), _perplexity(variant, ctx.quick)
    return q / fp, q, fp


# ------------------------------------------------------------------ claims


def perplexity_ratio_int8(ctx: Context) -> Result:
    """Held-out perplexity of int8 per-channel RTN (every block linear and the tied head / embedding) / fp32."""
    ratio, q, fp = _ratio_to_fp32("int8 rtn+head", ctx)
    no_head, q_nh, _ = _ratio_to_fp32("int8 rtn", ctx)
    return Result(ratio, "x", details={"perplexity_fp32": fp, "perplexity_int8_head_quantized": q,
                                       "perplexity_int8_head_fp32": q_nh, "ratio_head_fp32": no_head,
                                       "held_out_tokens": len(_held_out(ctx.quick)) - 1})


def perplexity_increase_int4_gptq(ctx: Context) -> Result:
    """Held-out perplexity of 4-bit GPTQ (g128 asymmetric, act-order, block linears; head fp32) / fp32."""
    ratio, q, fp = _ratio_to_fp32("int4 gptq g128", ctx)
    return Result(ratio, "x", details={"perplexity_fp32": fp, "perplexity_int4_gptq_g128": q,
                                       "calibration": f"{len(_calibration(ctx.quick))} x 256 train tokens"})


GPTQ_DETAILS_FULL = ["int4 gptq g128 no-act-order", "int4 gptq g64", "int4 gptq g32", "int4 gptq",
                     "int4 gptq g128+head"]


def gptq_vs_rtn_4bit(ctx: Context) -> Result:
    """Perplexity of 4-bit GPTQ / 4-bit RTN (both g128 asymmetric, block linears, head fp32): below 1 when
    GPTQ helps. Identical codes would make the comparison vacuous, so they are an error, not a 1.0."""
    codes, errors = _gptq_codes(4, 128, True, False, ctx.quick)
    rtn_model = _variant("int4 rtn g128", ctx.quick)
    if all(torch.equal(rtn_model.get_submodule(n).codes(), q) for n, (q, _, _) in codes.items()):
        raise MeasurementError("GPTQ gave round-to-nearest's codes on every layer: nothing was compared")
    g, r = _perplexity("int4 gptq g128", ctx.quick), _perplexity("int4 rtn g128", ctx.quick)
    details = {"perplexity_gptq_g128_act_order": g, "perplexity_rtn_g128": r,
               "perplexity_fp32": _perplexity("fp32", ctx.quick),
               "layers_where_gptq_error_below_rtn": sum(e["gptq"] <= e["rtn"] for e in errors.values()),
               "layers": len(errors),
               "layer_error_gptq_over_rtn": {n: round(e["gptq"] / e["rtn"], 4) for n, e in errors.items()}}
    pairs = [("int4 gptq g128+head", "int4 rtn g128+head")] if ctx.quick else \
        [(v, v.replace("gptq", "rtn").replace(" no-act-order", "")) for v in GPTQ_DETAILS_FULL]
    for gv, rv in pairs:
        details[f"perplexity {gv}"] = _perplexity(gv, ctx.quick)
        details[f"perplexity {rv}"] = _perplexity(rv, ctx.quick)
    return Result(g / r, "x", details=details)


def _saved_dir(root: Path, name: str, model: torch.nn.Module, scheme: Scheme | None, lm_head: bool) -> Path:
    meta = _base()[1]
    path = root / name.replace(" ", "_").replace("+", "_")
    if scheme is None:
        zoo.save_dir(path, model, meta)
    else:
        names = modules.linear_names(_base()[0], lm_head=lm_head)
        modules.save_quantized(path, model, meta, modules.quantization_meta(scheme, names, "rtn"))
    return path


def load_saved(path: str):
    """Peak-memory target: a callable that loads the model saved at ``path`` (fp32/fp16 or quantized)."""
    def load():
        return modules.load_quantized(path)[0] if "int" in Path(path).name else zoo.load_dir(path)[0]
    return load


def model_size_reduction(ctx: Context) -> Result:
    """fp32 file bytes / int8 file bytes (per-channel RTN, block linears and the tied head / embedding), both
    written by the project's savers; fp16, int4 and head-in-fp32 files and the resident memory of a fresh
    process that loads each file are in the details."""
    base = _base()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = {"fp32": _saved_dir(root, "fp32", base, None, False),
                 "fp16": _saved_dir(root, "fp16", copy.deepcopy(base).half(), None, False)}
        for name, scheme, head in [("int8+head", INT8, True), ("int8", INT8, False),
                                   ("int4 g128+head", INT4, True), ("int4 g128", INT4, False)]:
            files[name] = _saved_dir(root, name, _rtn(scheme, head), scheme, head)
        sizes = {k: (p / "model.safetensors").stat().st_size for k, p in files.items()}
        held = {k: peak_memory_bytes("benchmarks.workloads.ptq:load_saved", measure="held", path=str(p))
                for k, p in files.items() if k in ("fp32", "int8+head", "int4 g128+head")}
    details = {"file_bytes": sizes,
               "fp32_over": {k: round(sizes["fp32"] / v, 3) for k, v in sizes.items()},
               "fp16_over": {k: round(sizes["fp16"] / v, 3) for k, v in sizes.items()},
               "process_held_bytes_after_load": held,
               "process_fp32_over_int8": held["fp32"] / held["int8+head"]}
    return Result(sizes["fp32"] / sizes["int8+head"], "x", details=details)


TABLE = ["fp32", "int8 rtn", "int8 rtn+head", "int8 w8a8", "llm.int8", "int4 rtn g128", "int4 gptq g128",
         "bnb int8", "bnb nf4"]


def int8_speed_and_table(ctx: Context) -> Result:
    """Tokens/s of a forward over 4 x 256 held-out tokens, int8 W8A8 (torch._int_mm) / fp32 (interleaved, median
    of per-round ratios); the size / perplexity / speed table of every variant is in the details and plots."""
    block = _base()[0].config.block_size
    x = torch.from_numpy(_held_out(ctx.quick)[: 4 * block].astype("int64")).view(4, block)
    variants = TABLE[:4] if ctx.quick else TABLE
    models = {v: _variant(v, ctx.quick) for v in variants}

    def forward(m):
        return lambda: m(x)

    with torch.no_grad():
        t = interleaved({v: forward(m) for v, m in models.items()}, rounds=3 if ctx.quick else 5)
    ratio, spread = t.ratio("fp32", "int8 w8a8")
    tokens = x.numel()
    table = {v: {"tokens_per_s": tokens / t.median_s(v), "perplexity": _perplexity(v, ctx.quick),
                 "weight_mib": _weight_bytes(models[v]) / MIB} for v in variants}
    plot = Plot("size, perplexity and speed of each variant", x=variants,
                series={"weight MiB": [table[v]["weight_mib"] for v in variants],
                        "perplexity": [table[v]["perplexity"] for v in variants],
                        "k tokens/s": [table[v]["tokens_per_s"] / 1000 for v in variants]}, kind="bar")
    return Result(ratio, "x", spread=spread, details={"table": table, "threads": torch.get_num_threads()},
                  plots=[plot])


def _weight_bytes(model: torch.nn.Module) -> int:
    from reference.bnb_int8 import layer_nbytes

    total = modules.model_nbytes(model)
    for m in model.modules():
        if type(m).__module__.startswith("bitsandbytes"):
            total += layer_nbytes(m) - sum(p.numel() * p.element_size() for p in m.parameters())
    return total
