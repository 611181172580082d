# usage: nohup bash .devtmp/gpu/frontier.sh > /root/frontier/driver.log 2>&1 &   (on the device, repo root)
# Generic recipe (the generic mix, LEAF loss, 5 epochs, batch 512) for each frontier student, all at once on the GPU,
# then the quality half of eval/frontier.py. Marks /root/frontier/TRAINED and /root/frontier/DONE.
source .devtmp/gpu/setup.sh
R=/root/frontier; mkdir -p $R/logs
DATA=$($PY -c "from leafkd.data.mixes import generic_mix; print(' '.join('--data ' + s for s in generic_mix()))")
t0=$(date +%s)
$PY -m leafkd capture --teacher $TEACHER $DATA --out $R/vectors --quiet > $R/logs/capture.log 2>&1
echo "capture rc $? $(( $(date +%s) - t0 )) s" >> $R/logs/capture.log
COMMON="--teacher $TEACHER $DATA --vectors $R/vectors --epochs 5 --batch-size 512 --warmup 0.03 --leaf-l2 1.0 \
 --heldout 2000 --eval-every 1000 --checkpoint-every 0 --seed 0 --plot false --progress false"
declare -A RUNS=(
  [t6]="--student teacher --student-layers first:6 --lr 2e-4"
  [t3]="--student teacher --student-layers first:3 --lr 2e-4"
  [t3-lr1e-3]="--student teacher --student-layers first:3 --lr 1e-3"
  [m6]="--student $MINILM --lr 1e-3 --projection-lr 1e-3"
  [m3]="--student $MINILM --student-layers first:3 --lr 1e-3 --projection-lr 1e-3"
  [m2]="--student $MINILM --student-layers first:2 --lr 1e-3 --projection-lr 1e-3"
  [s256]="--student static --static-dim 256 --lr 1e-3 --projection-lr 1e-3"
  [s256-lr1e-2]="--student static --static-dim 256 --lr 1e-2 --projection-lr 1e-3"
)
for name in "${!RUNS[@]}"; do
  ( s=$(date +%s); $PY -m leafkd train $COMMON ${RUNS[$name]} --output $R/runs/$name > $R/logs/$name.log 2>&1
    echo "rc $? wall $(( $(date +%s) - s )) s" >> $R/logs/$name.log ) &
done
wait
touch $R/TRAINED
SPECS=""
for name in t6 t3 t3-lr1e-3 m6 m3 m2 s256 s256-lr1e-2; do
  [ -f $R/runs/$name/model/leafkd.json ] && SPECS="$SPECS $name=$R/runs/$name/model"
done
$PY eval/frontier.py --quality --teacher $TEACHER --out $R/quality $SPECS > $R/logs/quality.log 2>&1
echo "quality rc $? at $(( $(date +%s) - t0 )) s" >> $R/logs/quality.log
touch $R/DONE
