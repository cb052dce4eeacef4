"""Project 7: mixed precision training and inference. ``naive.FixedLossScaler`` scales the loss
by a constant; ``fast.DynamicLossScaler`` grows and backs off the scale and skips overflowing
steps (``torch.amp.GradScaler``'s interface and rule); ``inference`` runs the GPT in bf16;
``benchmark`` compares FP32, FP16 and BF16."""
