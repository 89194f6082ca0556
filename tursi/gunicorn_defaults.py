"""Gunicorn settings for Tursi; gunicorn.conf.py in a checkout imports these.

Every value can be overridden by the environment variable shown."""
import os

bind = f"{os.environ.get('TURSI_HOST', '127.0.0.1')}:{os.environ.get('TURSI_PORT', '8000')}"
# gevent: one OS process serves many concurrent (streaming) connections; model compute runs
# on native threads inside it, so the hub stays responsive.
worker_class = "gevent"
# Each worker loads its own copy of every model: keep 1 unless memory allows more.
workers = int(os.environ.get("TURSI_WORKERS", "1"))
worker_connections = int(os.environ.get("TURSI_WORKER_CONNECTIONS", "1000"))
# Never preload: forking after torch has started its OpenMP threads deadlocks.
preload_app = False
timeout = int(os.environ.get("TURSI_WORKER_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("TURSI_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
accesslog = os.environ.get("TURSI_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("TURSI_LOG_LEVEL", "info")
# The access log shows method, path and status, never the Authorization header.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
