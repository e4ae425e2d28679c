"""The actors of an espo-async run: thin shells around espo_async.core, one process each."""
