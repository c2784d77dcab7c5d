"""Cartridges by self-study: corpus -> synthesis -> training -> evaluation (see each module's docstring)."""
