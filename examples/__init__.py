"""Training scripts on real data that ships inside packages (see docs/examples.md)."""
