#!/bin/bash
# The ablation runs of README.md here: the in-traffic pass for main's classifier, then for
# the patched one with each switch alone and all together.
#   bash run.sh CHECKOUT PATCHED OUT
# CHECKOUT: a checkout of the commit measured (1181459); PATCHED: another, with ablate.patch
# applied (git apply); OUT: where the runs go. Run on a quiet machine (about 21 minutes).
set -eu
checkout=$1 patched=$2 out=$3
python=${PYTHON:-python3}
for v in base shared clock counters events all; do
    case $v in base) switches="";; all) switches="shared,clock,counters,events";; *) switches=$v;; esac
    dir=$patched
    [ "$v" = base ] && dir=$checkout
    echo "== $v ($switches) $(date -u +%T)"
    (cd "$dir" && MIRROR_ABLATE=$switches PYTHONPATH=$dir "$python" -m bench --passes in_traffic \
        --configs mirror-clsact,mirror-decide,thesis --out "$out/$v" --no-plots)
done
