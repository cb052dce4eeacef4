"""Quantization-aware training (project 16): fake quantization with a straight-through estimator
(``naive.py``: an autograd Function over the shared primitives; ``fast.py``: one fused pass), the QAT
fine-tuning loop and the export to integer weights (``train.py``). See README.md."""
