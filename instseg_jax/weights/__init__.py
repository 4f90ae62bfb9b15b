"""Importers of weights trained by other libraries."""
