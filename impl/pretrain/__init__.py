"""Project 3: pre-train a GPT-style base model (125M parameters for a 10K BPE vocabulary) with
mixed precision, gradient checkpointing, memory-mapped token files and experiment tracking."""
