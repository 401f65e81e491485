#!/usr/bin/env bash
# The whole HuBERT loop on the built-in corpus, from a checkout root:
#   bash recipes/synth_hubert/run.sh
# Every step skips what is done and training resumes where it stopped, so a rerun after
# an interruption goes on. Times and results: recipes/synth_hubert/README.md.
set -euo pipefail
E=${ECHOIC:-.venv/bin/echoic}
PY=${PYTHON:-.venv/bin/python}
D=data/hubert
CORPUS=data/synth_en
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

stamp() { echo "== $(date +%H:%M:%S) $*"; }

stamp corpus
make $CORPUS/lang_char/cmvn.json
mkdir -p $D

# The labelled subset (10% of train, drawn with a fixed seed) and a fixed dev subset:
# what the probe and the fine-tuning runs see.
if [ ! -f $D/probe_dev.jsonl ]; then
  $PY - <<'EOF'
import numpy as np
from echoic.data.manifest import read_manifest, write_manifest
train = read_manifest("data/synth_en/train.jsonl").utterances
dev = read_manifest("data/synth_en/dev.jsonl").utterances
rng = np.random.default_rng(2106)
write_manifest("data/hubert/probe_train.jsonl",
               [train[i] for i in sorted(rng.choice(len(train), len(train) // 10, replace=False))])
write_manifest("data/hubert/probe_dev.jsonl",
               [dev[i] for i in sorted(rng.choice(len(dev), min(200, len(dev)), replace=False))])
EOF
fi

stamp "iteration 1 targets: k-means of MFCC"
[ -f $D/km_it1/report.json ] || $E kmeans --manifest $CORPUS/train.jsonl \
  --manifest $CORPUS/dev.jsonl --features mfcc --k 100 --out $D/km_it1 --jobs 2
stamp "iteration 1 pretraining"
$E train recipes/synth_hubert/conf/pretrain_it1.yaml --exp exp/hubert_it1
[ -f exp/hubert_it1/hf/config.json ] || $E export --exp exp/hubert_it1 --format hf --out exp/hubert_it1/hf

stamp "the same architecture, randomly initialised (no step taken)"
$E train recipes/synth_hubert/conf/pretrain_it1.yaml --exp exp/hubert_random \
  --set train.max_steps=0 --set probe=null
[ -f exp/hubert_random/hf/config.json ] || $E export --exp exp/hubert_random --format hf --out exp/hubert_random/hf

stamp "fine-tuning: iteration 1, random, and an fbank Conformer"
$E train recipes/synth_hubert/conf/finetune.yaml --exp exp/hubert_ft_it1 \
  --set model.frontend.ssl.path=exp/hubert_it1/hf
$E train recipes/synth_hubert/conf/finetune.yaml --exp exp/hubert_ft_random \
  --set model.frontend.ssl.path=exp/hubert_random/hf
$E train recipes/synth_hubert/conf/fbank_baseline.yaml --exp exp/hubert_fbank

decode() {
  local exp=$1
  for split in test test_open; do
    out=$exp/decode_$split
    [ -f $out/hyp.jsonl ] || $E decode --exp $exp --manifest $CORPUS/$split.jsonl \
      --method attention_rescoring --beam 10 --out $out
    $E score --ref $CORPUS/$split.jsonl --hyp $out/hyp.jsonl --by-speaker $CORPUS/train.jsonl \
      > $out/score.txt
  done
}
stamp decode
for exp in exp/hubert_ft_it1 exp/hubert_ft_random exp/hubert_fbank; do decode $exp; done

stamp "iteration 2 targets: k-means of iteration 1's layer 3"
[ -f $D/km_it2/report.json ] || $E kmeans --manifest $CORPUS/train.jsonl \
  --manifest $CORPUS/dev.jsonl --features ssl:exp/hubert_it1/hf:3 --k 200 --out $D/km_it2
stamp "iteration 2 pretraining"
$E train recipes/synth_hubert/conf/pretrain_it2.yaml --exp exp/hubert_it2
[ -f exp/hubert_it2/hf/config.json ] || $E export --exp exp/hubert_it2 --format hf --out exp/hubert_it2/hf

stamp "fine-tuning iteration 2"
$E train recipes/synth_hubert/conf/finetune.yaml --exp exp/hubert_ft_it2
decode exp/hubert_ft_it2
$E plot --exp exp/hubert_it1 --out exp/hubert_it1/curves.png
$E plot --exp exp/hubert_it2 --out exp/hubert_it2/curves.png
stamp done
