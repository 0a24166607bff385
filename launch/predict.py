"""Use what a run trained: its final delta on its rebuilt backbone, evaluated on a file or asked for predictions.

    python launch/predict.py run_dir=outputs/lora_t5_tiny                          # the run's evaluation set
    python launch/predict.py run_dir=outputs/lora_t5_tiny file=dev.jsonl out=predictions.jsonl
    python launch/predict.py run_dir=outputs/lora_t5_tiny "text=reverse: abc" "text=upper: xyz"

``file`` holds rows in the run's data format and columns; ``out`` receives one JSON line per row (input, target,
prediction). ``device`` (cpu | cuda) and ``batch_size`` are optional. The library call is
``opendelta_dist.train.predict.load_run`` (then ``evaluate`` or ``predict``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from opendelta_dist.errors import OpenDeltaError
from opendelta_dist.train.predict import evaluate, load_run, predict

KEYS = ("run_dir", "file", "out", "text", "device", "batch_size")

USAGE = (
    "usage: python launch/predict.py run_dir=PATH [file=PATH] [out=PATH] [text=TEXT ...] [device=cpu|cuda] "
    "[batch_size=N]"
)


def parse(argv: list[str]) -> dict[str, list[str]]:
    """``key=value`` arguments (``text`` may repeat)."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        raise SystemExit(0)
    options: dict[str, list[str]] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(f"{USAGE}; got {arg!r}")
        options.setdefault(key, []).append(value)
    if "run_dir" not in options:
        raise SystemExit(f"{USAGE}: run_dir names the training run to use")
    return options


def main(argv: list[str]) -> int:
    """Evaluate (or predict) and print; a library error is one line and exit status 1."""
    options = parse(argv)
    batch_size = options.get("batch_size", ["32"])[0]
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise SystemExit(f"batch_size={batch_size!r}: rows per forward, a positive integer (e.g. batch_size=32)")
    batch_size = int(batch_size)
    try:
        run = load_run(options["run_dir"][0], device=options.get("device", ["cpu"])[0])
        if "text" in options:
            for text, prediction in zip(options["text"], predict(run, options["text"], batch_size), strict=True):
                print(f"{text!r} -> {prediction!r}")
            return 0
        metrics, rows = evaluate(run, options.get("file", [None])[0], batch_size)
    except OpenDeltaError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{len(rows)} rows: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if "out" in options:
        path = Path(options["out"][0])
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"predictions written to {path}")
    else:
        for row in rows[:5]:
            print(f"  {row['input']!r} -> {row['prediction']!r} (target {row['target']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
