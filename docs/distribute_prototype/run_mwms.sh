#!/bin/bash
# usage: run_mwms.sh MODE [extra env]; two workers, each bounded by timeout
MODE=$1
read P0 P1 < <(python -c "
import socket
s=[socket.socket() for _ in range(2)]
[x.bind(('127.0.0.1',0)) for x in s]
print(*[x.getsockname()[1] for x in s])
[x.close() for x in s]")
cd /tmp
PYTHONPATH=/tmp/distribute_lab timeout 180 python /tmp/distribute_lab/scripts/mwms.py 0 $P0 $P1 $MODE > /tmp/distribute_lab/mwms0.log 2>&1 &
A=$!
PYTHONPATH=/tmp/distribute_lab timeout 180 python /tmp/distribute_lab/scripts/mwms.py 1 $P0 $P1 $MODE > /tmp/distribute_lab/mwms1.log 2>&1 &
B=$!
wait $A $B
for i in 0 1; do grep -v "^W0000\|^I0000\|WARNING: All log\|^WARNING:absl" /tmp/distribute_lab/mwms$i.log | grep "^\[w\|^    " ; done
