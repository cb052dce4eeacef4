"""Project 17: pruning a GPT, unstructured (magnitude per layer / global, Wanda) and structured (heads,
MLP neurons, matrices really shrunk), one-shot or iterative with masked fine-tuning.

- ``naive.py`` / ``fast.py``: the masks (a Python sort per group / one stable tensor sort), same results;
- ``unstructured.py``: masks for a whole model, Wanda's calibration pass, masked fine-tuning on the
  shared loop, iterative pruning;
- ``structured.py``: head and neuron importance, shrinking, the equivalent masks.
"""
