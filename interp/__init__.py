"""looplens interp."""
