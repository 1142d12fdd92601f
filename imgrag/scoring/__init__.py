"""``imgrag eval``'s scores, paired statistics and class folders."""
