"""Example lookstream plugin package: a colour-histogram encoder."""
