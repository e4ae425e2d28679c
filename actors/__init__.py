"""The actors of an espo-async run, one process each (docs/architecture.md): no actor imports
another's module; what they share lives in espo_async/ and protocols/."""
