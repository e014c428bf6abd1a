"""The family of explicit-rule ops, one module each."""
