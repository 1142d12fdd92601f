"""The ``imgrag`` command line: one module per command group, options and output in ``common``."""
