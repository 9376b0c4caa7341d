"""Adapters that bring APT to policies of other robot-learning libraries (optional extras, imported lazily)."""
