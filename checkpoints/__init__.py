"""mlmscope: checkpoints."""
