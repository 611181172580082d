# usage: setsid nohup bash .devtmp/gpu/s2.sh > /root/s2/driver.log 2>&1 &   (on the device, repo root)
# Issue 21's last runs, all at once on the GPU: the teacher's 6-layer cut with the generic recipe at lr 1e-3, and
# the corpus-adapted recipe (`leafkd distill`, defaults) for MiniLM:first:2 and static:256 on the three corpora and
# for teacher:first:3 on Cranfield. Each corpus's teacher vectors are captured once (by the MiniLM:first:2 run);
# the other runs of that corpus start from a copy of that store. Marks /root/s2/TRAINED and /root/s2/DONE.
source .devtmp/gpu/setup.sh
R=/root/s2; mkdir -p $R/logs $R/runs $R/out
declare -A PATHS=([scifact]=$S/data/beir/scifact [cranfield]=$S/data/classic/cranfield [npl]=$S/data/classic/npl)
t0=$(date +%s)
stamp() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/logs/driver-times.log; }

distill() {  # distill NAME CORPUS STUDENT [VECTORS_FROM]
  local name=$1 c=$2 student=$3 from=$4 out=$R/runs/$1
  if [ -n "$from" ]; then
    until grep -q '"complete": true' $R/runs/$from/teacher-vectors/manifest.json 2>/dev/null; do sleep 3; done
    mkdir -p $out && cp -r $R/runs/$from/teacher-vectors $out/
  fi
  stamp "start $name"
  local s=$(date +%s)
  $PY -m leafkd distill ${PATHS[$c]} --teacher $TEACHER --student $student --out $out --seed 0 --quiet \
    > $R/logs/$name.log 2>&1
  echo "rc $? wall $(( $(date +%s) - s )) s" >> $R/logs/$name.log
  stamp "end $name"
  cp $out/summary.json $R/out/$name.summary.json 2>/dev/null
  cp $out/student/model/leafkd.json $R/out/$name.leafkd.json 2>/dev/null
  cp $out/student/metrics.jsonl $R/out/$name.metrics.jsonl 2>/dev/null
}

generic() {
  local DATA=$($PY -c "from leafkd.data.mixes import generic_mix; print(' '.join('--data ' + s for s in generic_mix()))")
  $PY -m leafkd capture --teacher $TEACHER $DATA --out $R/generic-vectors --quiet > $R/logs/capture.log 2>&1
  echo "capture rc $? at $(( $(date +%s) - t0 )) s" >> $R/logs/capture.log
  stamp "start t6-lr1e-3"
  local s=$(date +%s)
  $PY -m leafkd train --teacher $TEACHER $DATA --vectors $R/generic-vectors --epochs 5 --batch-size 512 --warmup 0.03 \
    --leaf-l2 1.0 --heldout 2000 --eval-every 1000 --checkpoint-every 0 --seed 0 --plot false --progress false \
    --student teacher:first:6 --lr 1e-3 --output $R/runs/t6-lr1e-3 > $R/logs/t6-lr1e-3.log 2>&1
  echo "rc $? wall $(( $(date +%s) - s )) s" >> $R/logs/t6-lr1e-3.log
  stamp "end t6-lr1e-3"
  cp $R/runs/t6-lr1e-3/metrics.jsonl $R/out/t6-lr1e-3.metrics.jsonl 2>/dev/null
  cp $R/runs/t6-lr1e-3/model/leafkd.json $R/out/t6-lr1e-3.leafkd.json 2>/dev/null
}

generic &
for c in scifact cranfield npl; do
  distill $c-m2 $c $MINILM:first:2 &
  distill $c-s256 $c static:256 $c-m2 &
done
distill cranfield-t3 cranfield teacher:first:3 cranfield-m2 &
wait
touch $R/TRAINED
[ -f $R/runs/t6-lr1e-3/model/leafkd.json ] && $PY eval/frontier.py --quality --teacher $TEACHER --out $R/quality \
  teacher:first:6=$R/runs/t6-lr1e-3/model > $R/logs/quality.log 2>&1
echo "quality rc $? at $(( $(date +%s) - t0 )) s" >> $R/logs/quality.log
touch $R/DONE
