"""mlmscope: analyses."""
