"""Time-to-quality curves of reconstruction runs, read from their ``metrics.jsonl`` (the engine's log).

For each run (``LABEL=RUN_DIR``): at each time mark, the mean PSNR of the training rays over the 50 logged steps
before it (IDR: the rays that hit the surface inside the mask; UNISURF/NeRF: all rays), the training-ray mask
IoU where the method logs one (IDR), and the last validation of the first held-out view before it (``val_psnr``,
``val_mask_iou``, logged with ``--validate-every``); then the run's final held-out metrics (all held-out views,
``metrics.json``). Times are the engine's ``time_s`` (training, validations included). Optionally draws the
training-ray PSNR against time, one line per run, into a PNG (``--plot``).

    python benchmarks/time_to_quality.py hash=runs/dtu_idr_hash freq=runs/dtu_idr --marks 60 300 900 \\
        --plot docs/images/time_to_quality_dtu_idr.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def read_rows(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def at_time(rows: list[dict], t: float, window: int = 50) -> dict:
    """Smoothed training metrics and the last validation before time ``t`` (None where there are none)."""
    before = [r for r in rows if r["time_s"] <= t]
    last = before[-window:]
    out = {"iteration": before[-1]["iteration"] if before else 0}
    for key in ("psnr", "iou"):
        values = [r[key] for r in last if finite(r.get(key))]
        out[key] = sum(values) / len(values) if values else None
    validations = [r for r in before if "val_psnr" in r]
    out["val_psnr"] = validations[-1]["val_psnr"] if validations else None
    out["val_mask_iou"] = validations[-1].get("val_mask_iou") if validations else None
    return out


def smoothed_curve(rows: list[dict], window: int = 50) -> list[tuple[float, float]]:
    points = [(r["time_s"], r["psnr"]) for r in rows if finite(r.get("psnr"))]
    curve = []
    for i in range(window, len(points) + 1, max(1, window // 5)):
        chunk = points[i - window:i]
        curve.append((chunk[-1][0], sum(p for _, p in chunk) / window))
    return curve


def plot(curves: dict[str, list[tuple[float, float]]], path: Path, size=(720, 420)) -> None:
    """Training-ray PSNR (dB) against minutes, one coloured line per run, with a legend (PIL only)."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 60, 20, 20, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for c in curves.values() for p in c]
    if not points:
        raise SystemExit("--plot: no PSNR values in the runs")
    t_max = max(t for t, _ in points) / 60
    y_lo = math.floor(min(p for _, p in points))
    y_hi = math.ceil(max(p for _, p in points))

    def xy(t, p):
        x = left + (t / 60) / max(t_max, 1e-9) * (w - left - right)
        y = top + (y_hi - p) / max(y_hi - y_lo, 1e-9) * (h - top - bottom)
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for y in range(y_lo, y_hi + 1):
        _, py = xy(0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((8, py - 6), f"{y} dB", fill="black")
    step = max(1, round(t_max / 8))
    for m in range(0, int(t_max) + 1, step):
        px, _ = xy(m * 60, y_lo)
        draw.line([px, h - bottom, px, h - bottom + 4], fill="black")
        draw.text((px - 4, h - bottom + 8), str(m), fill="black")
    draw.text((w // 2 - 80, h - 18), "minutes (training-ray PSNR, dB)", fill="black")
    for i, (label, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(curve) > 1:
            draw.line([xy(t, p) for t, p in curve], fill=colour, width=2)
        draw.rectangle([left + 10, top + 8 + 16 * i, left + 22, top + 18 + 16 * i], fill=colour)
        draw.text((left + 28, top + 6 + 16 * i), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (a tdr reconstruct output folder)")
    p.add_argument("--marks", type=float, nargs="+", default=[60, 120, 300, 600, 900],
                   help="times (s) to report")
    p.add_argument("--plot", type=Path, help="write the training-ray PSNR curves here (PNG)")
    args = p.parse_args()
    runs = {}
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep or not (Path(folder) / "metrics.jsonl").is_file():
            raise SystemExit(f"{spec}: expected LABEL=RUN_DIR with a metrics.jsonl")
        runs[label] = Path(folder)

    def fmt(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    print("| run | time (s) | iteration | training-ray PSNR | training-ray IoU | held-out view 0: PSNR | IoU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    curves = {}
    for label, run in runs.items():
        rows = read_rows(run)
        curves[label] = smoothed_curve(rows)
        end = rows[-1]["time_s"]
        for t in [m for m in args.marks if m < end] + [end]:
            r = at_time(rows, t)
            print(f"| {label} | {t:.0f} | {r['iteration']} | {fmt(r['psnr'])} | {fmt(r['iou'], 3)} | "
                  f"{fmt(r['val_psnr'])} | {fmt(r['val_mask_iou'], 3)} |")
    print("\nFinal held-out metrics (all held-out views, metrics.json):")
    for label, run in runs.items():
        final = run / "metrics.json"
        if final.is_file():
            metrics = json.loads(final.read_text())
            held = metrics.get("heldout") or {}
            print(f"  {label}: {metrics.get('iterations')} iterations in {fmt(metrics.get('train_seconds'), 0)} s; "
                  f"held-out PSNR (mask) {fmt(held.get('psnr'))} dB, mask IoU {fmt(held.get('mask_iou'), 3)}")
    if args.plot:
        plot(curves, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
