#!/usr/bin/env bash
# Benchmark of the replica store against its peers, on one machine in one run:
#   incremental `store commit` vs a second `restic backup` of the same image, and vs reading and
#   BLAKE3-hashing the image once (b3sum); `store export` vs `cp --sparse=always`; store growth;
#   peak memory of every verb.
# Usage: bench/store.sh [SIZE_GIB] [ROUNDS]   (default 4 GiB, 3 rounds)
# Needs: restic, b3sum, /usr/bin/time (apt-get install restic b3sum time); writes a table to
# stdout and, with WRITE_DOCS=1, to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
size_gib=${1:-4}
rounds=${2:-3}
for tool in restic b3sum /usr/bin/time python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install restic b3sum time python3" >&2; exit 1; }
done
cargo build --release -q
bin=$PWD/target/release/boomerang
work=${BENCH_DIR:-$(mktemp -d /var/tmp/boomerang-bench.XXXXXX)}
trap 'rm -rf "$work"' EXIT
image=$work/disk.img
store=$work/store
repo=$work/restic
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$work/restic-cache
results=$work/results.tsv
: >"$results"

log() { printf '== %s\n' "$*" >&2; }
# Runs a command under /usr/bin/time; appends "name<TAB>seconds<TAB>peak KiB" to results.
measure() {
  local name=$1; shift
  /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" >"$work/$name.out" 2>"$work/$name.err" || {
    cat "$work/$name.err" >&2; exit 1; }
  read -r secs kib <"$work/time.txt"
  printf '%s\t%s\t%s\n' "$name" "$secs" "$kib" >>"$results"
}

log "creating a ${size_gib} GiB image of random data"
head -c "$((size_gib << 30))" /dev/urandom >"$image"

log "first commit and first restic backup (not compared)"
"$bin" store init "$store" --block-size 64KiB >/dev/null
measure initial_commit "$bin" store commit "$store" --disk bench --image "$image" --output json
restic init --repo "$repo" -q
measure initial_restic restic backup --repo "$repo" -q "$image"

for r in $(seq 1 "$rounds"); do
  log "round $r: changing 1% of the 64 KiB blocks at random"
  python3 - "$image" "$r" <<'PY'
import os, random, sys
path, seed = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
blocks = size // 65536
rng = random.Random(seed)
with open(path, "r+b") as f:
    for b in rng.sample(range(blocks), blocks // 100):
        f.seek(b * 65536)
        f.write(rng.randbytes(65536))
PY
  sync
  measure "b3sum_$r" b3sum "$image"
  measure "commit_$r" "$bin" store commit "$store" --disk bench --image "$image" --output json
  measure "restic_$r" restic backup --repo "$repo" -q "$image"
done

log "export vs cp --sparse=always (both synced to disk), $rounds rounds"
for r in $(seq 1 "$rounds"); do
  measure "export_$r" "$bin" store export "$store" --disk bench --out "$work/export.img"
  rm -f "$work/export.img"
  measure "cp_$r" bash -c "cp --sparse=always '$image' '$work/copy.img' && sync '$work/copy.img'"
  rm -f "$work/copy.img"
done
measure verify "$bin" store verify "$store" --output json
measure prune "$bin" store prune "$store" --keep 1 --output json
measure gc "$bin" store gc "$store" --output json

python3 - "$results" "$work" "$size_gib" "$rounds" <<'PY' | tee "$work/report.md"
import json, statistics, sys
results, work, size_gib, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t = {}
for line in open(results):
    name, secs, kib = line.split("\t")
    t[name] = (float(secs), int(kib))
def med(prefix):
    return statistics.median(t[f"{prefix}_{r}"][0] for r in range(1, rounds + 1))
commit, restic, b3 = med("commit"), med("restic"), med("b3sum")
stats = [json.load(open(f"{work}/commit_{r}.out")) for r in range(1, rounds + 1)]
changed = statistics.median(s["bytes_changed"] for s in stats)
stored = statistics.median(s["bytes_stored"] - s["node_bytes_stored"] for s in stats)
nodes = statistics.median(s["node_bytes_stored"] for s in stats)
size = size_gib << 30
exp, cp = med("export"), med("cp")
peak = max(v[1] for k, v in t.items() if not k.startswith(("restic", "initial_restic", "b3sum", "cp")))
print(f"Image: {size_gib} GiB of random data, 64 KiB blocks, 1% of blocks rewritten at random between commits; medians of {rounds} rounds (exports: {rounds} alternating runs of each).")
print()
print("| measure | Boomerang | peer | ratio | target |")
print("| --- | --- | --- | --- | --- |")
print(f"| incremental commit vs second `restic backup` | {commit:.2f} s | {restic:.2f} s | {restic/commit:.2f}x faster | >= 3x faster |")
print(f"| incremental commit vs `b3sum` of the image | {commit:.2f} s | {b3:.2f} s | {commit/b3:.2f}x the time | <= 1.5x |")
print(f"| store growth vs changed bytes | {stored/2**20:.1f} MiB | {changed/2**20:.1f} MiB changed | {stored/changed:.3f}x | <= 1.05x |")
print(f"| tree metadata written vs disk size | {nodes/2**10:.0f} KiB | {size/2**30:.0f} GiB | {nodes/size*100:.4f}% | < 1% |")
print(f"| export vs `cp --sparse=always` + sync | {exp:.2f} s | {cp:.2f} s | {cp/exp:.2f}x the throughput | >= 0.8x |")
print(f"| peak RSS of any store verb | {peak/1024:.0f} MiB | | | < 256 MiB |")
print()
print("Peak RSS per verb (KiB): " + ", ".join(f"{k} {v[1]}" for k, v in sorted(t.items()) if not k.startswith(("restic", "initial_restic", "b3sum", "cp"))))
PY
if [ "${WRITE_DOCS:-0}" = 1 ]; then
  bench/write-docs.py 'Replica store (`bench/store.sh`)' "$work/report.md"
fi
