#!/usr/bin/env bash
# Fault scenarios through the `fxstore` command, as a user meets them (run by tests/test_faults.py).
# Usage: tests/faults_cli.sh WORKDIR   (PYTHON: the interpreter; PYTHONPATH must reach fxstore and tests/)
set -u
work=${1:?usage: faults_cli.sh WORKDIR}
py=${PYTHON:-python3}
fx() { "$py" -m fxstore "$@"; }  # (background runs call "$py" directly, so that $! is its pid)
fail() { echo "FAIL: $*"; exit 1; }
one_line() {  # the file holds exactly one line, with the expected text, and no traceback
  [ "$(wc -l < "$1")" -eq 1 ] || { cat "$1"; fail "$2: not one line"; }
  grep -q -- "$3" "$1" || { cat "$1"; fail "$2: no '$3'"; }
  ! grep -q Traceback "$1" || fail "$2: traceback"
}
same_data() {  # every file but the manifest is byte-identical
  (cd "$1" && ls -A | grep -v '^manifest.json$') > "$work/a.list"
  (cd "$2" && ls -A | grep -v '^manifest.json$') > "$work/b.list"
  cmp -s "$work/a.list" "$work/b.list" || fail "$1 and $2 hold different files"
  while read -r f; do cmp -s "$1/$f" "$2/$f" || fail "$1/$f differs"; done < "$work/a.list"
}
cd "$work" || exit 1
args=(dataset_helpers:toy_cnn --layers conv1 fc --data fake:96 --image-size 16 --batch-size 2 --shard-size 8 --quiet)

# 1. foreign files: refused, --overwrite deletes nothing
mkdir mine && echo '{"mine": 1}' > mine/manifest.json && echo notes > mine/notes.txt && cp mine/notes.txt mine/target.npy
(cd mine && sha256sum * > ../mine.sums)
fx extract "${args[@]}" --out mine 2> err.txt && fail "foreign folder accepted"
one_line err.txt "foreign files" "holds files fxstore did not write (manifest.json (not an fxstore manifest"
fx extract "${args[@]}" --out mine --overwrite 2> err.txt && fail "--overwrite accepted a foreign folder"
one_line err.txt "--overwrite on foreign files" "notes.txt; target.npy"
(cd mine && sha256sum -c --quiet ../mine.sums) || fail "a user file changed"
echo "ok 1 foreign files kept, refused with --overwrite too"

# 2. an uninterrupted run is the reference
fx extract "${args[@]}" --out clean || fail "clean run"
fx verify clean > out.txt || fail "verify of a clean run"
grep -q "every sha256 checksum matches" out.txt || fail "verify says: $(cat out.txt)"

# 3. kill -9 mid-run, then the same command resumes to identical bytes
"$py" -m fxstore extract "${args[@]}" --out killed & pid=$!
for _ in $(seq 2000); do [ -n "$(ls killed/.fxstore-progress 2>/dev/null)" ] && break; sleep 0.01; done
kill -9 $pid; wait $pid 2>/dev/null
echo "   killed with $(ls killed/.fxstore-progress 2>/dev/null | wc -l) of 12 shards marked done"
fx extract "${args[@]}" --out killed || fail "resume after kill -9"
same_data killed clean
echo "ok 3 kill -9 and resume: byte-identical"

# 4. flipped bytes: verify and info name the file, the same command repairs
"$py" -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[-300:-236]=bytes(x^255 for x in b[-300:-236]); open(p,'wb').write(bytes(b))" killed/shard-00003.safetensors
fx verify killed > out.txt && fail "verify missed flipped bytes"
grep -q "BAD shard-00003.safetensors: checksum mismatch" out.txt || fail "verify says: $(cat out.txt)"
fx info killed | grep -q '"verified": false' || fail "info does not say unverified"
fx extract "${args[@]}" --out killed 2> err.txt || fail "repair run"
grep -q "repairing '.*killed': shard-00003.safetensors" err.txt || fail "no repair message: $(cat err.txt)"
fx verify killed > /dev/null || fail "verify after repair"
same_data killed clean
echo "ok 4 flipped bytes found by verify, repaired by the same command"

# 5. a tampered manifest is refused, not followed
cp -r clean tampered
"$py" -c "import json,sys; p=sys.argv[1]; m=json.load(open(p)); m['shards'][0]['file']='../mine/notes.txt'; json.dump(m, open(p,'w'))" tampered/manifest.json
fx verify tampered 2> err.txt && fail "tampered manifest verified"
one_line err.txt "tampered manifest" "is not a valid fxstore manifest: shard 0 names the file '../mine/notes.txt'"
echo "ok 5 tampered manifest refused"

# 6. a second run on a busy folder is refused at once, naming the first; the first completes
hold=(dataset_helpers:held_cnn "${args[@]:1}")
touch hold && export FXSTORE_TEST_HOLD="$work/hold"   # the first run pauses in its first batch
"$py" -m fxstore extract "${hold[@]}" --out busy & pid=$!
for _ in $(seq 30000); do [ -d busy/.fxstore-progress ] && break; sleep 0.01; done
fx extract "${hold[@]}" --out busy --overwrite 2> err.txt && fail "second run accepted"
rm hold
one_line err.txt "concurrent run" "being written by another fxstore run (process $pid on"
wait $pid || fail "the first run failed"
fx verify busy > /dev/null || fail "the first run's folder does not verify"
echo "ok 6 concurrent run refused, the first one completed"

# 7. info into a closed pipe: no "Broken pipe"
fx info clean 2> err.txt | true
[ ! -s err.txt ] || { cat err.txt; fail "info into a closed pipe printed errors"; }
echo "ok 7 info | head: quiet"

# 8. no CUDA, a factory that needs arguments: one line, no traceback
if "$py" -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then
  fx extract "${args[@]}" --out gpu --device cuda 2> err.txt && fail "cuda accepted without CUDA"
  one_line err.txt "--device cuda" "device='cuda' is not available on this machine"
fi
fx nodes torch.nn:Linear 2> err.txt && fail "a factory needing arguments accepted"
one_line err.txt "factory with arguments" "'torch.nn:Linear' cannot be called without arguments"
echo "ok 8 bad device and factory: one-line errors"

echo "all CLI fault scenarios passed"
