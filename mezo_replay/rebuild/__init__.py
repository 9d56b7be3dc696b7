"""Turning a trajectory back into weights: full checkpoints replayed on a base, and PEFT adapter folders
rebuilt from the trajectory alone, both verified against the fingerprints the trajectory records."""
