"""Is evaluate.py's confusion decision right? The toy-world study of it, rung by rung, against the referee.

A thin command over clif/toyworld/confusion_study.py (the same as `python -m clif.toyworld confusion-study`):

    python scripts/confusion_metric_study.py --roots outputs/evidence outputs/metric22 \
        --json pretrained/toyworld/confusion_metric_study.json
    python scripts/confusion_metric_study.py --json pretrained/toyworld/confusion_metric_study.json --from_json

It writes the study's JSON and rewrites the generated block of docs/evaluation.md (`--readme`) from it.
"""

from __future__ import annotations

from clif.toyworld.confusion_study import BEGIN, END, main

__all__ = ["BEGIN", "END", "main"]

if __name__ == "__main__":
    main()
