"""Data, the SR evaluation protocol, and distillation training (issue 3)."""
