"""Model files: which files each role needs, the hub layouts, what a weight file holds, and loading errors."""
