"""nn-decompositions: harvest, train and evaluate sparse decompositions of transformer MLPs."""

__version__ = "0.1.0"
