"""Data, the SR evaluation protocol, and distillation training."""
