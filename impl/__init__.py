"""Our implementations: one package per technique, naive.py beside fast.py."""
