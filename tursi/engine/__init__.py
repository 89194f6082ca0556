"""Model engine: the catalog, loading, the lock-guarded manager, and per model a worker thread
running the batching scheduler.

It serves HTTP and scripts alike: it imports neither Flask nor tursi.api, only the shared
modules at the package root (config, errors, formatting, telemetry, threads), and gevent
only through tursi.threads, which works without it.
"""
