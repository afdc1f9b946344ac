"""Cloud RSS (VmRSS, RssAnon, RssFile of the server process) while one client streams a cold split."""
import os, subprocess, sys, threading, time, json
import pyarrow.flight as flight
from mist_fed.wire.request import FeatureRequest
from mist_fed.data import get_task
task, split, n, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
extra = sys.argv[5:]
ids = list(get_task(task).split(split).ids[:n])
env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
port = 8931
store = "/tmp/wtc/memstore-%d" % time.time()
srv = subprocess.Popen([".venv/bin/mist-fed", "cloud", "serve", "--port", str(port), "--tasks", task,
    "--cache-dir", store, *extra], env=env)
def rss():
    d = {}
    for line in open(f"/proc/{srv.pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"): d[k] = int(v.split()[0]) // 1024
    return d
client = None
for _ in range(600):
    try:
        client = flight.connect(f"grpc+tcp://127.0.0.1:{port}"); list(client.do_action(flight.Action("health", b""))); break
    except Exception: time.sleep(1)
time.sleep(2)
idle = rss(); print("idle MB", idle, flush=True)
peak = dict(idle); stop = False
def sampler():
    while not stop:
        r = rss()
        for k, v in r.items(): peak[k] = max(peak[k], v)
        time.sleep(0.5)
threading.Thread(target=sampler, daemon=True).start()
t = time.time(); rows = 0; last = 0
reader = client.do_get(flight.Ticket(FeatureRequest(task, split, "mist", 12, dtype, tuple(ids)).to_json()))
for chunk in reader:
    rows += chunk.data.num_rows
    if rows - last >= 256:
        last = rows; print(rows, rss(), "peak", peak, round(rows / (time.time() - t), 2), "img/s", flush=True)
stop = True
print(json.dumps({"rows": rows, "s": round(time.time() - t, 1), "idle_mb": idle, "peak_mb": peak, "end_mb": rss(), "store_du": subprocess.run(["du", "-sh", store], capture_output=True, text=True).stdout.split()[0]}), flush=True)
srv.terminate(); srv.wait()
