"""User data loaders: BaseDataLoader subclasses found by name from the config."""
