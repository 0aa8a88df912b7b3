"""User models, losses and metrics: plain classes and functions, found by name from the config."""
