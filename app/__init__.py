"""looplens app."""
