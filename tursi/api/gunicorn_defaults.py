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
# No gunicornc control socket: Tursi does not use it, it is one more way in, and every
# master on a host would share its default path ($HOME/.gunicorn/gunicorn.ctl).
control_socket_disable = True
# The access log shows method, path and status, never the Authorization header.
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'

# --- Folders the workers share: Prometheus multiprocess mode (see docs/prometheus.md) and the
# server's desired state and worker reports (TURSI_RUN_DIR, tursi.engine.server_state). Each
# is the operator's when set, else a fresh temporary one for this master, removed at exit.
_dirs_made_here: dict[str, str] = {}  # environment variable -> the folder made for it


def on_starting(server):
    """Master start, before any worker: the shared folders, named in the environment that
    the workers inherit."""
    _metrics_dir()
    server.log.info("Prometheus multiprocess folder: %s", os.environ["PROMETHEUS_MULTIPROC_DIR"])
    _run_dir()
    server.log.info("Run folder (desired models, worker reports): %s", os.environ["TURSI_RUN_DIR"])


def _run_dir() -> None:
    """The workers of this master reconcile to one desired state kept here. A fresh folder
    starts from TURSI_PRELOAD; an operator's folder keeps what was loaded across restarts."""
    if not os.environ.get("TURSI_RUN_DIR"):
        import tempfile

        path = tempfile.mkdtemp(prefix="tursi-run-")
        _dirs_made_here["TURSI_RUN_DIR"] = path
        os.environ["TURSI_RUN_DIR"] = path
    os.makedirs(os.environ["TURSI_RUN_DIR"], exist_ok=True)


def _metrics_dir() -> None:
    """An empty metrics folder; prometheus_client reads it when first imported, in a worker."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        import tempfile

        path = tempfile.mkdtemp(prefix="tursi-prometheus-")
        _dirs_made_here["PROMETHEUS_MULTIPROC_DIR"] = path
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # a previous run's values would be added to this one's
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def child_exit(server, worker):
    """A worker died: its live gauges (running, waiting, memory) stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Master exit: remove the shared folders this master made, and their names from the
    environment (a process that starts a master again must not inherit a removed folder)."""
    import shutil

    while _dirs_made_here:
        variable, path = _dirs_made_here.popitem()
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(variable) == path:
            del os.environ[variable]


def post_worker_init(worker):
    """SIGTERM drains: new requests get 503, in-flight ones finish (tursi.api.lifecycle);
    requests gunicorn cannot parse get a JSON error body (tursi.api.gunicorn_errors)."""
    from tursi.api import gunicorn_errors
    from tursi.api.lifecycle import drain_on_sigterm

    drain_on_sigterm(worker)
    gunicorn_errors.install()
    _catch_up(worker)


def _catch_up(worker):
    """A worker that joins a server whose other workers already serve models (it replaces a
    killed one) first loads them, so that no request reaches it while its copies load. It
    tells the master it is alive meanwhile (a load may outlast the worker timeout); a load
    that fails ends the wait (the model shows failed)."""
    import time

    manager = worker.wsgi.extensions["tursi"].manager
    waiting = manager.catching_up()
    if waiting:
        worker.log.info("loading %s before taking connections", ", ".join(waiting))
    while waiting:
        worker.notify()
        time.sleep(0.25)
        waiting = manager.catching_up()
