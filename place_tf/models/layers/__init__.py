"""PLACE and baseline layers, one module per concept."""
