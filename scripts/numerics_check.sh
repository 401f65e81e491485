#!/usr/bin/env bash
# Did a change move any number? Runs every recipe's first steps with the code of one
# checkout and writes a digest (train/dev/probe lines without timing, the last
# checkpoint's weights sha256, decoded hypotheses); run it for the commit before and
# after, then `diff BEFORE/digest.txt AFTER/digest.txt` (issue 37 compared 832830b and
# fe37f4b this way: identical).
#
#   scripts/numerics_check.sh data DATA_DIR          # once: the small corpora it needs
#   scripts/numerics_check.sh run CHECKOUT OUT_DIR DATA_DIR
#
# CHECKOUT is a git worktree of the commit (`git worktree add /tmp/before 832830b`); the
# echoic of this repository's .venv runs it through PYTHONPATH. One thread; STEPS
# (default 60) steps per recipe, 200 for the demo. About 25 minutes per checkout.
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
E=$HERE/.venv/bin/echoic
PY=$HERE/.venv/bin/python
if [ "${1:-}" = data ]; then
  DATA=$(realpath -m "$2"); mkdir -p "$DATA"; cd "$DATA"
  export OMP_NUM_THREADS=1
  en=data/synth_en
  [ -f $en/lm_text.txt ] || $E synth --out $en --num-utts 800 --hotword-test --hotword-utts 60 --jobs 2 --no-progress
  [ -f $en/lang_char/cmvn.json ] || $E prepare --manifest $en/train.jsonl --tokenizer char --out $en/lang_char --jobs 2
  [ -f data/synth_shift/lm_text.txt ] || $E synth --out data/synth_shift --domain shifted \
    --num-utts 300 --jobs 2 --no-progress --hotword-test --hotword-utts 30
  [ -f data/synth_zh/lang_char/cmvn.json ] || { $E synth --out data/synth_zh --lang zh \
    --num-utts 400 --jobs 2 --no-progress && $E prepare --manifest data/synth_zh/train.jsonl \
    --tokenizer char --out data/synth_zh/lang_char --jobs 2; }
  [ -f data/hubert/km_it1/tokenizer.json ] || $E kmeans --manifest $en/train.jsonl \
    --manifest $en/dev.jsonl --features mfcc --k 20 --out data/hubert/km_it1 --jobs 2 --no-progress
  [ -d data/ssl_upstream ] || $PY "$HERE/scripts/make_ssl_upstream.py" --out data/ssl_upstream
  # The HuBERT recipe's probe sets: a slice of train and dev, audio beside them.
  head -120 $en/train.jsonl > data/hubert/probe_train.jsonl
  cp $en/dev.jsonl data/hubert/probe_dev.jsonl
  ln -sfn ../synth_en/wav data/hubert/wav
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 data DATA_DIR | run CHECKOUT OUT_DIR DATA_DIR" >&2; exit 2; }
CODE=$(realpath "$2"); ROOT=$(realpath -m "$3"); DATA=$(realpath "$4"); STEPS=${STEPS:-60}
mkdir -p "$ROOT" && cd "$ROOT"
ln -sfn "$DATA/data" data
export PYTHONPATH=$CODE OMP_NUM_THREADS=1
R=$CODE/recipes
common="train.num_threads=1 train.log_every=10 train.valid_every=30 train.save_every_steps=30"
run() { # name config steps [overrides...]
  local name=$1 conf=$2 steps=$3; shift 3
  rm -rf exp/$name
  local args=()
  for kv in train.max_steps=$steps $common "$@"; do args+=(--set "$kv"); done
  $E train $conf --exp exp/$name --no-progress "${args[@]}" > logs_$name.txt 2>&1
  echo "$name rc=$?"
}
mkdir -p exp
run demo $R/synth_en/conf/demo.yaml 200 train.valid_every=100 train.save_every_steps=100
$E decode --exp exp/demo --manifest data/synth_en/test.jsonl --method attention_rescoring --beam 20 \
  --lm data/synth_en/lm_text.txt --attention-weight 0.25 --ctc-weight 0.5 --out exp/demo/decode_test > logs_demo_decode.txt 2>&1; echo "demo decode rc=$?"
for m in ctc_greedy ctc_prefix_beam attention attention_rescoring; do
  $E decode --exp exp/demo --manifest data/synth_en/test.jsonl --method $m --out exp/demo/dec_$m > /dev/null 2>&1; echo "demo $m rc=$?"; done
$E export --exp exp/demo --format onnx --out exp/demo/export > /dev/null 2>&1; echo "export rc=$?"
run tiny $R/synth_en/conf/tiny.yaml 50
run transducer $R/synth_en/conf/transducer.yaml $STEPS
$E decode --exp exp/transducer --manifest data/synth_en/test.jsonl --method rnnt_greedy --out exp/transducer/dec > /dev/null 2>&1; echo "rnnt decode rc=$?"
run demo_transducer $R/synth_en/conf/demo_transducer.yaml $STEPS
run paraformer $R/synth_en/conf/paraformer.yaml $STEPS
$E decode --exp exp/paraformer --manifest data/synth_en/test.jsonl --method paraformer --out exp/paraformer/dec > /dev/null 2>&1; echo "paraformer decode rc=$?"
run robust $R/synth_en/conf/robust.yaml $STEPS
run large $R/synth_en/conf/large.yaml 20 train.valid_every=10 train.save_every_steps=10
run ssl $R/synth_en/conf/ssl.yaml $STEPS
run seaco $R/synth_seaco/conf/seaco.yaml $STEPS
$E decode --exp exp/seaco --manifest data/synth_en/hotword_test.jsonl --method paraformer --hotwords data/synth_en/hotwords.txt --out exp/seaco/dec > /dev/null 2>&1; echo "seaco decode rc=$?"
run contextual $R/synth_seaco/conf/contextual.yaml $STEPS
for c in ft_naive ft_staged bias_stage ft_contextual; do run $c $R/synth_seaco/conf/$c.yaml $STEPS; done
for c in scratch naive staged; do run adapt_$c $R/synth_adapt/conf/$c.yaml $STEPS; done
run zh $R/synth_zh/conf/paraformer.yaml $STEPS
run hubert_it1 $R/synth_hubert/conf/pretrain_it1.yaml $STEPS probe.every_steps=30 probe.steps=20 train.precision=fp32
$E export --exp exp/hubert_it1 --format hf --out exp/hubert_it2/hf > /dev/null 2>&1; echo "hf export rc=$?"
run hubert_ft $R/synth_hubert/conf/finetune.yaml $STEPS
run fbank_baseline $R/synth_hubert/conf/fbank_baseline.yaml $STEPS
# digest
{
for d in exp/*/; do
  n=$(basename $d)
  [ -f $d/metrics.jsonl ] && python3 -c "
import json,sys
for line in open('$d/metrics.jsonl'):
    r=json.loads(line)
    if r.get('split')=='system': continue
    r={k:v for k,v in r.items() if not k.endswith('_s') and k not in ('elapsed_s','probe_seconds')}
    print('$n', json.dumps(r, sort_keys=True))"
  last=$(ls -d $d/checkpoints/step-* 2>/dev/null | tail -1)
  [ -n "$last" ] && echo "$n weights $(sha256sum $last/*.safetensors | cut -c1-16) $(basename $last)"
done
for h in exp/*/dec*/hyp.jsonl exp/*/decode_*/hyp.jsonl; do [ -f $h ] && echo "$h $(sha256sum $h | cut -c1-16)"; done
} > digest.txt
echo done
