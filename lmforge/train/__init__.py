"""The training loop shared by every stage."""
