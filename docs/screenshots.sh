#!/usr/bin/env bash
# Screenshots of a run's TensorBoard dashboards (Time Series, Images, Projector) with headless
# Chromium, for the README: bash docs/screenshots.sh RUN [OUT_DIR]
# Needs the Debian package chromium (apt-get install chromium); not part of CI.
set -euo pipefail
run=${1:?usage: bash docs/screenshots.sh RUN [OUT_DIR]}
out=${2:-docs/images}
python=${PYTHON:-python3}
mkdir -p "$out"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m tensorboard.main --logdir "$run/logs" --host 127.0.0.1 --port "$port" \
    --reload_interval 1 > /dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
for _ in $(seq 60); do
  curl -sf "http://127.0.0.1:$port/data/runs" | grep -q eval && break
  sleep 1
done
sleep 5  # the plugins' first reload
for dashboard in timeseries images projector; do
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
    --virtual-time-budget=20000 --screenshot="$out/tensorboard_$dashboard.png" \
    "http://127.0.0.1:$port/#$dashboard" 2> /dev/null
  echo "wrote $out/tensorboard_$dashboard.png"
done
