#!/bin/bash
# The client with the bare command's settings (30 epochs, 3 candidate k, float16 wire, VTAB-1k train/val, the
# official 10,000-image test split) on a fresh device storage, against the real offline cloud.
cd /tmp/target
export MIST_FED_CACHE=/tmp/target/cache FLWR_TELEMETRY_ENABLED=0
B=/work/main/.venv/bin
bare() { $B/python -c "import torch; print([int(l.split()[1])/1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"; }
echo "bare_torch_mb $(bare)"; date
$B/mist-fed client --task fashion-mnist --profile rpi4 --cloud grpc://127.0.0.1:8825 --device-dir /tmp/target/dev-full --out /tmp/target/full > full1.log 2>&1
echo "rc1 $?"; date
echo "bare_torch_mb $(bare)"
