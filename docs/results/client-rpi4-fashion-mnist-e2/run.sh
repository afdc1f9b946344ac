#!/bin/bash
# The issue-13 target, shortened in training only (--epochs 2; the splits, k candidates and the
# official 10,000-image test split are the bare command's): peak RSS over a bare `import torch`,
# then a rerun into another --out.
cd /tmp/target
export MIST_FED_CACHE=/tmp/target/cache FLWR_TELEMETRY_ENABLED=0
B=/work/main/.venv/bin
bare() { $B/python -c "import torch; print([int(l.split()[1])/1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"; }
echo "bare_torch_mb $(bare)"; date
$B/mist-fed client --task fashion-mnist --profile rpi4 --cloud grpc://127.0.0.1:8825 --out /tmp/target/run1 --epochs 2 > client1.log 2>&1
echo "rc1 $?"; date
echo "bare_torch_mb $(bare)"
$B/mist-fed client --task fashion-mnist --profile rpi4 --cloud grpc://127.0.0.1:8825 --out /tmp/target/run2 --epochs 2 > client2.log 2>&1
echo "rc2 $?"; date
