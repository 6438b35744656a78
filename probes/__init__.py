"""mlmscope: probes."""
