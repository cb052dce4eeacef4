"""TRL's supervised fine-tuning on our weights: its completion-only label masking, its data collator
(padded, or padding-free packing) and its SFT loss, the peer ``impl.sft`` must agree with.

TRL builds labels while preparing a dataset inside ``SFTTrainer`` and computes the loss in
``SFTTrainer.compute_loss``; neither is a free function. So this adapter builds a real ``SFTTrainer``
(pinned trl 1.16.0) around ``reference.hf_gpt2.to_hf`` of our GPT, hands it a pre-tokenized dataset
(``input_ids`` and a ``completion_mask`` that is 1 on exactly the tokens our labels train), lets TRL turn
that into labels and collate the batch, and calls its ``compute_loss``. The tokenizer TRL requires is a
word-level stand-in: the dataset is already tokenized, TRL only reads its pad token.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from impl.gpt.model import GPT
from impl.sft.fast import Example
from impl.sft.templates import IGNORE_INDEX
from reference.hf_gpt2 import to_hf


def _stand_in_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t0")


def rows_for_trl(examples: Sequence[Example]) -> list[dict[str, list[int]]]:
    """Our shifted examples back as TRL sees data: the full token ids and a completion mask that is 1 on
    each token one of our targets trains (TRL shifts inside the model's loss, we shifted beforehand)."""
    rows = []
    for ex in examples:
        last = ex.targets[-1] if ex.targets[-1] != IGNORE_INDEX else 0  # untrained last token: never read
        rows.append({"input_ids": [*ex.inputs, last], "completion_mask": [0] + [int(t != IGNORE_INDEX)
                                                                                 for t in ex.targets]})
    return rows


def sft_loss(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
             pack: int | None = None, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """TRL's loss on ``examples`` (mean over trained tokens) and its gradient on the token embedding;
    ``padding_free`` packs the batch into one row, TRL's packing collator (positions restart per example)."""
    from datasets import Dataset, disable_progress_bars
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()
    model = GPT.from_state(config, state)
    hf = to_hf(model).to(next(model.parameters()).dtype)
    rows = rows_for_trl(examples)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        args = SFTConfig(output_dir=out, completion_only_loss=True, padding_free=padding_free, report_to=[],
                         use_cpu=True, max_length=None, per_device_train_batch_size=len(rows),
                         dataset_num_proc=None, save_strategy="no")
        trainer = SFTTrainer(model=hf, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=_stand_in_tokenizer(config["vocab_size"]))
        prepared = trainer.train_dataset
        batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
        hf.train()
        loss = trainer.compute_loss(hf, dict(batch))
        loss.backward()
    return {"loss": loss.detach(), "grad_wte": hf.transformer.wte.weight.grad}


def packed_sft_loss(config: dict[str, Any], state: dict[str, torch.Tensor], examples: Sequence[Example],
                    pack: int | None = None) -> dict[str, torch.Tensor]:
    """``sft_loss`` with TRL's padding-free (packing) collator."""
    return sft_loss(config, state, examples, pack, padding_free=True)

