"""The search: Ray Tune + Optuna over embedding dim, rank and alpha, logged to MLflow."""
