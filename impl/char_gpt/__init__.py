"""Project 1: a character-level GPT trained on Shakespeare (nanoGPT's shakespeare_char recipe)."""
