"""The random-weight model kits (tiny and full-size) that stand in for real checkpoints."""
