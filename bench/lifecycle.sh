#!/usr/bin/env bash
# Benchmark of delta reprotect, all on 127.0.0.1, in one run:
# - `boomerang quickstart` on a SIZE disk: protect, a planned failover, then the machine
#   writes PERCENT% of the disk's 4 KiB blocks (scattered) at the failed-over site, and the
#   reprotect replicates it back into its original disk. Measured: the reprotect job's time
#   (from the request to the machine protected again) and the write data it moved;
# - on the same pair of images (copied just before the reprotect: the original disk, and the
#   failed-over one), `rsync --inplace --no-whole-file` from the failed-over image to the
#   original through an rsync daemon on loopback: its time and the bytes it sent.
# The RTO of instant failover and the time to materialize are measured by bench/recover.sh.
# Usage: bench/lifecycle.sh [SIZE] [PERCENT] (default 4GiB 1). With WRITE_DOCS=1 the report
# goes into docs/benchmarks.md. Needs: rsync, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4GiB}
percent=${2:-1}
for tool in rsync python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install $tool" >&2; exit 1; }
done
source bench/common.sh
bench_start lifecycle

log "quickstart: a $size disk, $percent% of its blocks written at the failed-over site"
"$bin" --output json quickstart --dir "$work/qs" --disk-size "$size" --workload-seconds 2 \
  --changed-percent "$percent" --keep-images >"$work/summary.json" || {
  cat "$work/summary.json" >&2
  echo "the quickstart failed: logs in $work/qs/logs (kept until this script ends)" >&2
  exit 1
}

log "rsync --inplace --no-whole-file on the same pair, through an rsync daemon"
mkdir -p "$work/rsync"
cp --sparse=always "$work/qs/images/a.img" "$work/rsync/disk.img"
port=$(free_port)
cat >"$work/rsyncd.conf" <<EOF
address = 127.0.0.1
port = $port
use chroot = no
pid file = $work/rsyncd.pid
[disks]
path = $work/rsync
read only = no
uid = $(id -u)
gid = $(id -g)
EOF
rsync --daemon --no-detach --config="$work/rsyncd.conf" & pids+=($!)
wait_port "$port"
start=$(now)
rsync --inplace --no-whole-file --stats "$work/qs/images/b.img" "rsync://127.0.0.1:$port/disks/disk.img" >"$work/rsync.stats"
rsync_s=$(elapsed "$start")
cmp "$work/rsync/disk.img" "$work/qs/images/b.img"
rsync_sent=$(awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); print $2 }' "$work/rsync.stats")

report=$work/report.md
python3 - "$work/summary.json" "$report" "$rsync_s" "$rsync_sent" "$percent" <<'EOF'
import json, sys
summary, out, rsync_s, rsync_sent, percent = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
s = json.load(open(summary))
assert s["ok"], s
seconds = s["reprotect_seconds"]
size, moved, changed = s["disk_size_bytes"], s["reprotect_bytes_moved"], s["reprotect_bytes_changed"]
budget = changed * 1.1 + size * 0.001
mib = lambda b: f"{b / 2**20:.1f} MiB"
with open(out, "w") as f:
    f.write(f"A {size / 2**30:.0f} GiB disk (a third of it data), {percent}% of its 4 KiB blocks written at the failed-over site, scattered ({mib(changed)}).\n\n")
    f.write("| Tool | Seconds | Bytes moved |\n|---|---|---|\n")
    f.write(f"| Boomerang reprotect (the whole job: release, adopt, attach, copy, protected) | {seconds:.2f} | {mib(moved)} of write data |\n")
    f.write(f"| `rsync --inplace --no-whole-file` to an rsync daemon (same pair) | {rsync_s:.2f} | {mib(rsync_sent)} sent |\n\n")
    f.write(f"- Bytes moved / changed: **{moved / changed:.3f}x**; within the budget of 1.1x the changed bytes + 0.1% of the disk ({mib(budget)}): **{'yes' if moved <= budget else 'NO'}**.\n")
    f.write(f"- Speed: rsync's time / the reprotect's: **{rsync_s / seconds:.1f}x** (target: at least 5x).\n")
    f.write(f"- The rest of the circle in the same run: failover RTO {s['failover_rto_seconds']:.2f} s, failback RTO {s['failback_rto_seconds']:.2f} s, the second reprotect moved {mib(s['reprotect_again_bytes_moved'])} for {mib(s['reprotect_again_bytes_changed'])} changed.\n")
EOF
cat "$report"
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  python3 bench/write-docs.py 'Delta reprotect (`bench/lifecycle.sh`)' "$report"
fi
