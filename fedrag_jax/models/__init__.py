"""Model definitions and checkpoint readers."""
