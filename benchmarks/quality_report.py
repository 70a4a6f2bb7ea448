"""The CPU budget run's verdict: a model's evaluation beside bicubic's, set by set.

    python -m benchmarks.quality_report --model OUT/student_eval.json --baseline OUT/bicubic_eval.json \
        --margin-db 0.3 --timings OUT/timings.json --out OUT/summary.json

Both inputs are `python -m trainers.evaluate --json` files. The summary holds each set's PSNR-Y,
bicubic's and the margin, whether every margin reaches --margin-db, and the stage wall times. The
exit status is 0 when the target is met, 3 when it is missed (the run itself worked), and 2 when an
input is unreadable or the two files do not cover the same sets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_agent.errors import UserError

MISSED = 3  # exit status: the run worked and the target was not reached


class ReportError(UserError, ValueError):
    """An input file is missing, not JSON, or not an evaluation of the same sets."""


def read_evaluation(path: str | Path) -> dict[str, dict[str, float]]:
    """{set name: {"psnr_y", "ssim_y", "n_images"}} from an evaluate --json file."""
    try:
        data = json.loads(Path(path).read_text())
        return {
            s["name"]: {
                "psnr_y": float(s["psnr_y"]),
                "ssim_y": float(s["ssim_y"]),
                "n_images": int(s["n_images"]),
            }
            for s in data["sets"]
        }
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; did the evaluation stage fail? (see its log)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"{path}: not a `trainers.evaluate --json` file ({exc})") from None


def compare(
    model: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]], margin_db: float
) -> dict:
    """Per-set margins over the baseline and whether each reaches margin_db."""
    if set(model) != set(baseline):
        raise ReportError(
            f"the model was evaluated on {sorted(model)} and the baseline on {sorted(baseline)}: "
            "evaluate both on the same sets"
        )
    sets = {}
    for name, result in model.items():
        base = baseline[name]
        if result["n_images"] != base["n_images"]:
            raise ReportError(
                f"{name}: {result['n_images']} images for the model, {base['n_images']} for the baseline"
            )
        margin = round(result["psnr_y"] - base["psnr_y"], 3)  # judged as reported: to 0.001 dB
        sets[name] = {
            "psnr_y": round(result["psnr_y"], 3),
            "ssim_y": round(result["ssim_y"], 4),
            "baseline_psnr_y": round(base["psnr_y"], 3),
            "margin_db": margin,
            "met": margin >= margin_db,
        }
    return {"target_margin_db": margin_db, "met": all(s["met"] for s in sets.values()), "sets": sets}


def format_summary(summary: dict) -> str:
    lines = [f"{'set':10s} {'model':>8s} {'bicubic':>8s} {'margin':>7s}"]
    for name, s in summary["sets"].items():
        mark = "ok" if s["met"] else f"< {summary['target_margin_db']}"
        lines.append(
            f"{name:10s} {s['psnr_y']:8.2f} {s['baseline_psnr_y']:8.2f} {s['margin_db']:+7.3f} {mark}"
        )
    verdict = "met" if summary["met"] else "MISSED"
    lines.append(f"target (every set at least {summary['target_margin_db']} dB above bicubic): {verdict}")
    if "timings_s" in summary:
        lines.append("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_report", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", required=True, help="the model's evaluate --json file")
    p.add_argument("--baseline", required=True, help="bicubic's evaluate --json file")
    p.add_argument("--margin-db", type=float, default=0.3, help="PSNR-Y a set must beat the baseline by")
    p.add_argument("--timings", help="JSON {stage: seconds} to include")
    p.add_argument("--out", help="write the summary as JSON here")
    args = p.parse_args(argv)
    try:
        summary = compare(read_evaluation(args.model), read_evaluation(args.baseline), args.margin_db)
        if args.timings:
            try:
                summary["timings_s"] = {
                    k: float(v) for k, v in json.loads(Path(args.timings).read_text()).items()
                }
            except (OSError, ValueError, AttributeError) as exc:
                raise ReportError(f"{args.timings}: not a JSON object of stage seconds ({exc})") from None
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["met"] else MISSED


if __name__ == "__main__":
    sys.exit(main())
