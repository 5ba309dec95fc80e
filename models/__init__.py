"""looplens models."""
