"""Real gunicorn (gevent worker) servers over loopback, and redis."""
