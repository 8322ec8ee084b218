#!/bin/bash
# The runs here: the in-traffic pass (configurations mirror-clsact, mirror-decide, thesis)
# alternating the classifier before the event's stepped copy (base) and after it (new),
# twice each, on a quiet machine (about 14 minutes).
#   bash run.sh BASE NEW OUT
# BASE: a checkout of 4256516; NEW: a checkout of daf9b73; OUT: where the runs go.
set -eu
base=$1 new=$2 out=$3
python=${PYTHON:-python3}
for i in 1 2; do
    for v in base new; do
        dir=$base
        [ "$v" = new ] && dir=$new
        echo "== $v$i $(date -u +%T)"
        (cd "$dir" && PYTHONPATH=$dir "$python" -m bench --passes in_traffic \
            --configs mirror-clsact,mirror-decide,thesis --out "$out/$v$i" --no-plots)
    done
done
