"""Project 15: KIVI KV-cache quantization (int8 / int4 keys per channel, values per token)."""
