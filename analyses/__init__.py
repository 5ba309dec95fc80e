"""looplens analyses."""
