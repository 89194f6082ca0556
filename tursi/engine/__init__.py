"""Model engine: catalog, loading, the lock-guarded manager and per-model worker threads.

Nothing in this package imports Flask.
"""
