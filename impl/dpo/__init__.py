"""Direct Preference Optimization (project 6): preference data, the DPO / IPO loss, batched training.

    from impl.dpo import pairs_from_tasks, train_dpo, preference_accuracy
    records = pairs_from_tasks(make_tasks(2000, seed=0), seed=0)   # {"prompt", "chosen", "rejected", "task"}
    result = train_dpo(policy, reference, tokenizer, records, beta=0.1, steps=200)
"""

from impl.dpo.data import pairs_from_tasks, read_preferences, tokenize_pair, write_preferences
from impl.dpo.fast import (
    DPOResult,
    ReferenceCache,
    collate,
    dpo_loss,
    preference_accuracy,
    sequence_logps,
    train_dpo,
)

__all__ = ["DPOResult", "ReferenceCache", "collate", "dpo_loss", "pairs_from_tasks", "preference_accuracy",
           "read_preferences", "sequence_logps", "tokenize_pair", "train_dpo", "write_preferences"]
