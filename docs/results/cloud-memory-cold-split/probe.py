"""The cloud's RSS (VmRSS, RssAnon, RssFile of the server process) while a client streams a
cold split: ``probe.py TASK SPLIT N DTYPE [serve flags...]`` (see README.md beside it);
``PROBE_METHOD`` picks the gather (default ``mist``), ``PROBE_STORE`` the store's folder (default
a new one in /tmp), which is kept for a later ``cloud serve --cache-dir``."""

import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.flight as flight

from mist_fed.data import get_task
from mist_fed.wire.request import FeatureRequest

PORT = 8931
KEYS = ("VmRSS", "RssAnon", "RssFile")


def rss(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in KEYS:
                out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    task, split, n, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    every = get_task(task).split(split).ids
    ids = tuple(every[:n]) if n < len(every) else None  # None: the whole split (no id list)
    store = os.environ.get("PROBE_STORE") or f"/tmp/memstore-{time.time():.0f}"
    method = os.environ.get("PROBE_METHOD", "mist")
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    cmd = [".venv/bin/mist-fed", "cloud", "serve", "--port", str(PORT), "--tasks", task]
    srv = subprocess.Popen([*cmd, "--cache-dir", store, *sys.argv[5:]], env=env)
    client = flight.connect(f"grpc+tcp://127.0.0.1:{PORT}")
    for _ in range(600):
        try:
            list(client.do_action(flight.Action("health", b"")))
            break
        except flight.FlightError:
            time.sleep(1)
    time.sleep(2)
    idle = rss(srv.pid)
    print("idle MB", idle, flush=True)
    peak = dict(idle)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in rss(srv.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    start, rows, last = time.time(), 0, 0
    ticket = flight.Ticket(FeatureRequest(task, split, method, 12, dtype, ids).to_json())
    for chunk in client.do_get(ticket):
        rows += chunk.data.num_rows
        if rows - last >= 256:
            last = rows
            rate = rows / (time.time() - start)
            print(rows, rss(srv.pid), "peak", peak, round(rate, 2), "img/s", flush=True)
    done.set()
    du = subprocess.run(["du", "-sh", store], capture_output=True, text=True).stdout.split()[0]
    took = round(time.time() - start, 1)
    report = {"rows": rows, "s": took, "idle_mb": idle, "peak_mb": peak, "end_mb": rss(srv.pid)}
    print(json.dumps({**report, "store_du": du}), flush=True)
    srv.terminate()
    srv.wait()


if __name__ == "__main__":
    main()
