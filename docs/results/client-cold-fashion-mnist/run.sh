#!/bin/bash
# cold bare client: fresh MIST_FED_CACHE, bare cloud serve, bare client (issue #24 target)
cd /work/main
export MIST_FED_CACHE=/work/cold-cache FLWR_TELEMETRY_ENABLED=0
rm -rf /work/cold-cache /work/cold-runs; mkdir -p /work/cold-runs
.venv/bin/mist-fed cloud serve > /work/cold-serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 120); do grep -q "8815" /work/cold-serve.log 2>/dev/null && break; sleep 1; done
date; echo client start
cd /work/cold-runs
/usr/bin/time -v /work/main/.venv/bin/mist-fed client --task fashion-mnist > /work/cold-client.log 2>&1
echo rc=$?
date; echo client done
kill $SERVE; wait $SERVE
