#!/usr/bin/env bash
# Quality tables (BENCHMARKS.md): original, RTN, our GPTQ and tools/gptq_torch.py's GPTQ on the
# same calibration tokens, each evaluated by `wgpress eval` on the held-out split.
# Usage: tools/quality.sh WGPRESS_BIN MODEL TEXT_DIR WORK_DIR [torch|ours|all] [SEQLEN] [NSAMPLES] [MAX_EVAL_TOKENS] [GROUP]
# GROUP (128) is the large group size of the table (SmolLM2's 576 inputs need 64).
# TEXT_DIR holds shakespeare-train.txt (calibration) and shakespeare-heldout.txt (evaluation),
# made by tools/shakespeare_splits.py. Calibration: NSAMPLES (128) windows of SEQLEN (256) tokens,
# seed 0; evaluation windows of SEQLEN tokens over the held-out text (or its first MAX_EVAL_TOKENS).
set -euo pipefail
BIN=$1; MODEL=$2; TXT=$3; W=$4; WHAT=${5:-all}; SEQ=${6:-256}; NS=${7:-128}; MAXT=${8:-}; G=${9:-128}
mkdir -p "$W"
CAL="--calib $TXT/shakespeare-train.txt --nsamples $NS --seqlen $SEQ --seed 0"
EVAL="--text $TXT/shakespeare-heldout.txt --seq-len $SEQ ${MAXT:+--max-tokens $MAXT}"
ev() { "$BIN" eval "$1" $EVAL --json "$W/$2.json" >/dev/null 2>&1 && python3 -c "import json;r=json.load(open('$W/$2.json'));print('$2', r['ppl'])"; }
"$BIN" calib-tokens $MODEL $CAL --out "$W/calib.safetensors" >/dev/null
if [ "$WHAT" != torch ]; then
  ev $MODEL original
  for cfg in "4 $G" "3 $G" "4 32 --sym"; do
    set -- $cfg; b=$1; g=$2; sym=${3:-}; tag="b${b}g${g}${sym:+sym}"
    "$BIN" compress $MODEL --bits $b --group $g $sym --format dense --dtype f32 --out "$W/rtn_$tag" >/dev/null 2>&1
    ev "$W/rtn_$tag" "rtn_$tag"
    for act in "" "--no-act-order"; do
      a=${act:+_noact}; a=${a:-_act}
      "$BIN" compress $MODEL --method gptq --bits $b --group $g $sym $act $CAL --format dense --dtype f32 --out "$W/gptq_$tag$a" >/dev/null 2>&1
      ev "$W/gptq_$tag$a" "gptq_$tag$a"
    done
  done
fi
if [ "$WHAT" != ours ]; then
  for cfg in "4 $G" "3 $G" "4 32 --sym"; do
    set -- $cfg; b=$1; g=$2; sym=${3:-}; tag="b${b}g${g}${sym:+sym}"
    for act in "--act-order" ""; do
      a=${act:+_act}; a=${a:-_noact}
      python3 tools/gptq_torch.py model --model $MODEL --calib-tokens "$W/calib.safetensors" --bits $b --group $g $sym $act --damp 0.01 --device cuda --out "$W/torch_$tag$a" >/dev/null 2>&1
      ev "$W/torch_$tag$a" "torch_$tag$a"
    done
  done
fi
