"""Cases for project 1: the same weights through naive, fast and HF GPT-2."""

import torch

from harness.cases import Cases
from tests.cases.gpt import logit_case, logit_strategy

logits = Cases(
    edge=[
        logit_case(0, 1, 1, 1, 1, 4, id="one-token"),
        logit_case(1, 2, 64, 4, 4, 32, id="nanogpt-recipe-shape"),
        logit_case(2, 3, 17, 2, 3, 8, vocab_size=7, id="odd-heads-and-length"),
        logit_case(3, 1, 33, 2, 2, 16, bias=False, id="no-bias"),
        logit_case(4, 2, 31, 2, 4, 16, dtype=torch.bfloat16, id="bf16"),
    ],
    strategy=logit_strategy(),
)
