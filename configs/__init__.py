"""Model presets and training recipes, shipped as TOML data files."""
