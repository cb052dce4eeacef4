"""Project 8: KV-cache. ``naive.generate`` recomputes the whole context each step;
``fast.generate`` keeps per-layer keys and values in a pre-allocated cache; ``concat.generate``
grows them by ``torch.cat`` every step (the textbook cache, the memory claim's naive side)."""
