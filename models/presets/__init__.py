"""Training presets as TOML files (package data); see models.train.presets and docs/training.md."""
