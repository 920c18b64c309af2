"""One table per sweep: every job's swept choices, final metrics, NFE, wall time and status, in the multirun folder.

Each job writes ``job.json`` in its run directory when it ends (``flowdiff.runs.write_job_record``: completed, or failed
with its one-line reason); :class:`SweepSummary`, a Hydra callback, reads them when the multirun ends, whatever
launcher ran the jobs (basic, joblib, submitit), and writes ``summary.csv`` and ``summary.md`` (and logs the table
to W&B when the jobs used it). A job that left no record (killed) is listed as ``no record``.

``python -m flowdiff.sweeps <multirun dir> --metric val/w2 --x sampler.steps --line sampler`` (or
``hydra.callbacks.summary.plot={x: sampler.steps, line: sampler}``) draws a metric against one swept axis with one
line per value of another.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("flowdiff")

JOB_RECORD = "job.json"
#: metrics shown first, when present; the rest follow in alphabetical order
HEADLINE = ["val/w2", "val/fid", "val/kid", "val/class_acc", "val/w2_floor", "val/fid_floor", "val/loss", "nfe"]


def _overrides(job_dir: Path) -> dict[str, str]:
    saved = job_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return {}
    pairs = (str(o).lstrip("+~").split("=", 1) for o in OmegaConf.load(saved))
    return {k: v for k, *rest in pairs for v in (rest or [""]) if not k.startswith("hydra")}


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder under ``sweep_dir`` (those with ``.hydra/overrides.yaml``), in job order:
    ``{"job", "status", "reason", "seconds", <overrides>..., <metrics>...}``."""
    rows = []
    for saved in sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml")):
        job_dir = saved.parent.parent
        record_path = job_dir / JOB_RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        row: dict[str, Any] = {
            "job": record.get("job", job_dir.name),
            "status": record.get("status", "no record"),
            "reason": record.get("reason", "" if record else "the job left no job.json (killed, or still running)"),
            "seconds": record.get("seconds", math.nan),
            "dir": str(job_dir.relative_to(sweep_dir)),
        }
        row.update({f"+{k}": v for k, v in _overrides(job_dir).items()})
        row.update(record.get("metrics", {}))
        rows.append(row)
    rows.sort(key=lambda r: (int(r["job"]) if str(r["job"]).isdigit() else math.inf, r["dir"]))
    return rows


def swept_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys whose value differs between jobs (a key set in one job only counts too)."""
    keys = sorted({k for r in rows for k in r if k.startswith("+")})
    return [k[1:] for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: job, the swept choices, status, the metrics (headline ones first), seconds, reason."""
    swept = swept_keys(rows)
    metric_keys = {k for r in rows for k in r if "/" in k or k == "nfe"} - {f"+{s}" for s in swept}
    metric_keys = {k for k in metric_keys if not k.startswith("+") and k != "dir"}
    metrics = [k for k in HEADLINE if k in metric_keys] + sorted(metric_keys - set(HEADLINE))
    header = ["job", *swept, "status", *metrics, "seconds", "reason"]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return "" if value is None else str(value)

    cells = []
    for r in rows:
        cells.append(
            [cell(r["job"])]
            + [cell(r.get(f"+{k}")) for k in swept]
            + [cell(r["status"])]
            + [cell(r.get(k)) for k in metrics]
            + [cell(r.get("seconds")), cell(r.get("reason"))]
        )
    return header, cells


def write_summary(sweep_dir: str | Path, plot: dict | None = None, rows: list | None = None) -> Path | None:
    """``summary.csv`` and ``summary.md`` in ``sweep_dir`` (and ``summary_<metric>.png`` with ``plot``) of ``rows``
    (by default :func:`collect`'s)."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    if not rows:
        return None
    header, cells = table(rows)
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    done = sum(r["status"] == "completed" for r in rows)
    md = f"# Sweep {sweep_dir.name}: {done} of {len(rows)} jobs completed\n\n" + "\n".join(lines) + "\n"
    (sweep_dir / "summary.md").write_text(md)
    if plot:
        plot_summary(rows, out=sweep_dir, **plot)
    return sweep_dir / "summary.md"


def plot_summary(
    rows: Sequence[dict[str, Any]], x: str, line: str | None = None, metric: str = "val/w2", out: str | Path = "."
) -> Path:
    """``metric`` against ``x`` (a numeric swept key such as ``sampler.steps``, or a recorded one such as ``nfe``),
    one line per value of the swept ``line``; completed jobs only."""
    from flowdiff.plotting import plt

    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        x_value = r.get(f"+{x}", r.get(x))
        if r["status"] != "completed" or x_value is None or not isinstance(r.get(metric), (int, float)):
            continue
        key = str(r.get(f"+{line}", "")) if line else metric
        groups.setdefault(key, []).append((float(x_value), float(r[metric])))
    if not groups:
        raise ValueError(f"no completed job has both {x} and {metric}: check the names (swept: {swept_keys(rows)})")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, points in sorted(groups.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{line}={key}" if line else key)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    if all(p[0] > 0 for pts in groups.values() for p in pts):
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / f"summary_{metric.replace('/', '_')}_vs_{x}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write its summary table (and plot, if configured); then, if any job did
    not complete, say how many and where the summary is, and exit with status 1 (``fail_on_failed_jobs=false``:
    status 0, so that a script or CI job can tell only by reading the summary)."""

    def __init__(self, plot: dict | None = None, fail_on_failed_jobs: bool = True) -> None:
        self.plot = dict(plot) if plot else None
        self.fail_on_failed_jobs = fail_on_failed_jobs

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        path = None
        try:
            path = write_summary(sweep_dir, self.plot, rows)
        except Exception as err:  # a broken summary (a plot, say) is reported, and the exit status still tells
            log.warning("no sweep summary: %s", err)
        if path is not None:
            log.info("sweep summary: %s", path)
            print(path.read_text(), flush=True)
            _log_to_wandb(config, sweep_dir)
        failed = sum(r["status"] != "completed" for r in rows)
        where = path or sweep_dir
        if not rows:
            print(f"no job records under {sweep_dir} (hydra.output_subdir=null?): no summary", flush=True)
            return
        if not failed:
            print(f"all {len(rows)} jobs completed; summary: {where}", flush=True)
            return
        print(f"{failed} of {len(rows)} jobs failed; summary: {where}", flush=True)
        if self.fail_on_failed_jobs:
            sys.exit(1)


def _log_to_wandb(config: DictConfig, sweep_dir: Path) -> None:
    spec = next((s for s in (config.get("logger") or {}).values() if s and "Wandb" in str(s.get("_target_"))), None)
    if spec is None:
        return
    import wandb

    header, cells = table(collect(sweep_dir))
    run = wandb.init(
        project=spec.get("project"),
        group=spec.get("group") or sweep_dir.name,
        name="summary",
        job_type="summary",
        dir=str(sweep_dir),
        reinit=True,
    )
    run.log({"sweep_summary": wandb.Table(columns=header, data=cells)})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise a multirun folder; optionally plot a metric.")
    parser.add_argument("sweep_dir")
    parser.add_argument("--metric", default="val/w2")
    parser.add_argument("--x", help="the swept key on the horizontal axis, e.g. sampler.steps")
    parser.add_argument("--line", help="one line per value of this swept key, e.g. sampler")
    args = parser.parse_args(argv)
    plot = {"x": args.x, "line": args.line, "metric": args.metric} if args.x else None
    path = write_summary(args.sweep_dir, plot)
    print(path.read_text() if path else f"no jobs under {args.sweep_dir}")


if __name__ == "__main__":
    main()
