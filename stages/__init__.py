"""Thin command-line entry points, one per pipeline stage (`nnd <stage>`)."""
