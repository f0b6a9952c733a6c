"""Evaluation: classification top-k error (detection and localization metrics alongside)."""
