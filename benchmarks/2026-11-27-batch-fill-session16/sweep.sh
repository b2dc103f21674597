#!/bin/bash
# usage: sweep.sh TAG DEVICE "sessions..." RUNS
tag=$1; dev=$2; sess=$3; runs=$4
for r in $(seq $runs); do for n in $sess; do
  livegen bench realtime --simulated-device $dev --sessions $n --fps 30 --duration 10 --warmup 2 --size 512 --json > $tag-$dev-$n-$r.json 2> $tag-$dev-$n-$r.err
done; done
