"""tursi.threads.off_hub under gevent's monkey patching, as gunicorn's gevent worker runs it
(a subprocess: patching is for the whole process): a greenlet's call runs on a thread of
the hub's pool, at most OFF_HUB_CALLS at once; a call from a thread that has no hub runs
where it is and makes none; an exception comes back to the caller without the hub printing
it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tursi

SCRIPT = """
import json
from gevent import monkey

monkey.patch_all()

import gevent
from gevent._hub_local import get_hub_if_exists

from tursi.threads import OFF_HUB_CALLS, native_ident, native_lock, native_sleep, off_hub

main = native_ident()
lock, running, most = native_lock(), [0], [0]


def busy():
    with lock:
        running[0] += 1
        most[0] = max(most[0], running[0])
    native_sleep(0.05)
    with lock:
        running[0] -= 1


def inner():
    return native_ident(), get_hub_if_exists() is not None


def outer():
    return native_ident(), off_hub(inner), get_hub_if_exists() is not None


def refuse():
    raise ValueError("refused")


def request():  # a greenlet, as a request is
    pool_thread, (inner_thread, inner_hub), outer_hub = off_hub(outer)
    try:
        off_hub(refuse)
        raised = None
    except ValueError as exc:
        raised = str(exc)
    gevent.joinall([gevent.spawn(off_hub, busy) for _ in range(OFF_HUB_CALLS + 2)])
    return {
        "at_once": [most[0], OFF_HUB_CALLS],
        "in_the_pool": pool_thread != main,
        "nested_runs_where_it_is": inner_thread == pool_thread,
        "hubs_made_in_the_pool": [inner_hub, outer_hub],
        "raised": raised,
    }


print(json.dumps(gevent.spawn(request).get()), flush=True)
"""


def test_off_hub_under_gevent():
    root = Path(tursi.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    most, allowed = outcome.pop("at_once")
    assert most == allowed
    assert outcome == {
        "in_the_pool": True,
        "nested_runs_where_it_is": True,
        "hubs_made_in_the_pool": [False, False],
        "raised": "refused",
    }
    assert "Traceback" not in result.stderr  # the hub printed nothing
