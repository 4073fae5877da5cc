#!/usr/bin/env bash
# Syscalls per message of one `mailmeter serve` process (listen.processes: 1): strace -c -f
# attached for a whole pass of smtp-source -m N (-s 20, 1 KB messages) into it, relayed to
# smtp-sink. A deterministic measure beside bench/run's CPU times (issue 19 item 3).
#
#   bash bench/syscalls.sh REV INLINE N OUTDIR    # e.g. bash bench/syscalls.sh HEAD 1 3000 /tmp/sys
#
# REV: a git revision of this checkout (installed into OUTDIR with pip, as bench/run does);
# INLINE: 1 writes spool.inline: true into the config (a revision that has it), 0 nothing.
# Needs strace and Postfix's smtp-source/smtp-sink (bench/run installs them), and .venv.
set -euo pipefail
REV=$1; INLINE=$2; N=$3; OUT=$4
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"
rm -rf "$OUT"; mkdir -p "$OUT/src" "$OUT/run"
git -C "$REPO" archive "$REV" | tar -x -C "$OUT/src"
$PY -m pip install -q --no-deps --target "$OUT/code" "$OUT/src" >/dev/null 2>&1
SINK=$(( 26000 + RANDOM % 2000 )); PORT=$(( 28000 + RANDOM % 2000 ))
smtp-sink -c -u nobody 127.0.0.1:$SINK 1024 > "$OUT/sink.log" 2>&1 & SINKPID=$!
spool='{"path": "spool"}'; [ "$INLINE" = 1 ] && spool='{"path": "spool", "inline": true}'
cat > "$OUT/run/config.yaml" <<EOC
{"node": {"name": "bench", "region": "bench"}, "hostname": "mailmeter.bench.test",
 "listen": {"address": "127.0.0.1", "port": $PORT, "processes": 1},
 "upstream": {"host": "127.0.0.1", "port": $SINK, "tls": "none", "timeout": 30},
 "delivery": {"workers": 4}, "database": {"path": "meter.db"}, "spool": $spool,
 "log": {"level": "info"}, "plans": {"bench": {"email_quota": 1000000000}}}
EOC
export PYTHONPATH="$OUT/code"
$PY -m mailmeter.cli --config "$OUT/run/config.yaml" account add bench --plan bench --sender-domain bench.test --network 127.0.0.0/8 > /dev/null
$PY -m mailmeter.cli --config "$OUT/run/config.yaml" serve > "$OUT/serve.log" 2>&1 & SERVE=$!
for i in $(seq 100); do grep -q relay.started "$OUT/serve.log" && break; sleep 0.1; done
smtp-source -s 20 -l 1024 -m 200 -f a@bench.test -t b@dest.test 127.0.0.1:$PORT   # warm-up
sleep 2
strace -c -f -q -o "$OUT/strace.txt" -p $SERVE & STRACE=$!
sleep 1
smtp-source -s 20 -l 1024 -m $N -f a@bench.test -t b@dest.test 127.0.0.1:$PORT
# until every message is delivered (the queue empty in the log's count)
for i in $(seq 600); do
  d=$(grep -c '"delivery.attempt"' "$OUT/serve.log" || true)
  [ "$d" -ge $(( N + 200 )) ] && break; sleep 0.2
done
sleep 1
kill -INT $STRACE; wait $STRACE || true
kill -TERM $SERVE; wait $SERVE || true
kill $SINKPID; wait $SINKPID 2>/dev/null || true
echo "delivered attempts: $(grep -c '"delivery.attempt"' "$OUT/serve.log")"
# strace -c columns: % time, seconds, usecs/call, calls, [errors,] syscall
awk -v n="$N" '$NF!="total" && $4 ~ /^[0-9]+$/ {printf "%-16s %8d  %.2f/msg\n", $NF, $4, $4/n}
  $NF=="total" {printf "%-16s %8d  %.2f/msg\n", "(all)", $4, $4/n}' "$OUT/strace.txt" | sort -k2 -n -r | head -25
