"""One table from several `worldmodel.eval` reports: every model and sampler as a row, PSNR / SSIM per horizon,
with copy-last and the autoencoder ceiling as their own rows (the baselines DESIGN §5 wants beside every number).

    python -m benchmarks.fidelity_table LABEL=EVAL.json [LABEL=EVAL.json ...] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(label: str, report: dict) -> list[tuple[str, dict[str, tuple[float, float]]]]:
    """(row name, {horizon: (psnr, ssim)}) for each sampler of one report."""
    out = []
    for r in report["results"]:
        out.append((f"{label}: {r['sampler']}",
                    {h: (m["model_psnr"], m["model_ssim"]) for h, m in r["horizons"].items()}))
    return out


def baselines(report: dict) -> list[tuple[str, dict[str, tuple[float, float]]]]:
    first = report["results"][0]["horizons"]
    return [("copy last context frame", {h: (m["copy_last_psnr"], m["copy_last_ssim"]) for h, m in first.items()}),
            ("autoencoder reconstruction (ceiling)", {h: (m["ae_recon_psnr"], float("nan")) for h, m in first.items()})]


def table(reports: list[tuple[str, dict]]) -> str:
    horizons = sorted({h for _, rep in reports for r in rep["results"] for h in r["horizons"]}, key=int)
    all_rows = [row for label, rep in reports for row in rows(label, rep)] + baselines(reports[0][1])
    head = "| model: sampler | " + " | ".join(f"h{h} PSNR / SSIM" for h in horizons) + " |"
    lines = [head, "|---|" + "---|" * len(horizons)]
    for name, vals in all_rows:
        cells = []
        for h in horizons:
            if h not in vals:
                cells.append("-")
                continue
            p, s = vals[h]
            cells.append(f"{p:.2f}" + ("" if s != s else f" / {s:.3f}"))  # s != s: NaN (no SSIM for the ceiling)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity_table", description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", help="LABEL=path/to/eval.json (worldmodel.eval --out)")
    p.add_argument("--out", default=None, help="also write the table here")
    a = p.parse_args(argv)
    reports = []
    for item in a.reports:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r}: give LABEL=PATH")
        if not Path(path).is_file():
            p.error(f"{path}: no such evaluation report (write one with python -m worldmodel.eval --out PATH)")
        reports.append((label, json.loads(Path(path).read_text())))
    text = table(reports)
    if a.out:
        Path(a.out).write_text(text)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
