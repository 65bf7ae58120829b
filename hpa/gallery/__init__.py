"""``hpa gallery``: many models (loader wildcards, model files, folders of them) scanned into one table.

The flow: :mod:`entries` expands the specs into models (each loader lists its own names), :mod:`scan_models`
scans each one in isolation into its own folder (a failure is a record with its reason), :mod:`summary`
turns the records into the table's rows (numpy and scipy only), :mod:`run` drives it all, here or
through an executor (hpa.executors), and writes gallery.csv, the coverage line and the figures
(hpa.render.gallery).  The folder's names are in :mod:`layout`.
"""
