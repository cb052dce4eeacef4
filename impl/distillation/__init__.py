"""Project 18: knowledge distillation (logit, feature, multi-teacher) of the shared GPT.

``naive.py`` writes the losses out from their formulas, ``fast.py`` fuses the KD loss with its gradient,
``train.py`` distils a student with the shared training loop. See README.md.
"""
