"""Core: what every layer shares (errors, the data layout, atomic files and locks, layer lists, hashes, progress).

Imports only the standard library (and tqdm lazily), so the Makefile can run
``python3 -m pipeline.core.paths`` before any virtual environment exists.
"""
