"""mlmscope: app."""
