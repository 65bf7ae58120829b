"""Framework adapters shared by several loaders (torch today).

Only loaders import from here; statistics never do.
"""
