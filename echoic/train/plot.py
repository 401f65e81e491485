"""`echoic plot`: loss, accuracy and learning-rate curves from metrics.jsonl, and a
pretraining run's downstream probe (WER and CER, right-hand axis) on the loss chart."""

from __future__ import annotations

from pathlib import Path

from echoic.errors import EchoicError
from echoic.train.metrics import read_metrics


def plot_curves(exp_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw train and dev curves of the experiment into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp_dir = Path(exp_dir)
    if not (exp_dir / "config.yaml").is_file():
        raise EchoicError(f"{exp_dir} is not an experiment folder (no config.yaml)")
    records = read_metrics(exp_dir / "metrics.jsonl")
    if not records:
        raise EchoicError(f"{exp_dir / 'metrics.jsonl'} has no metrics yet")
    out = Path(out) if out else exp_dir / "curves.png"
    panels = [("loss", "loss"), ("th_accuracy", "token accuracy"), ("lr", "learning rate")]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    stage_starts = _stage_starts(records)
    for axis, (key, title) in zip(axes, panels):
        for split, style in (("train", "-"), ("dev", "o-")):
            points = [
                (r["step"], r[key])
                for r in records
                if r["split"] == split and isinstance(r.get(key), int | float)
            ]
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, style, label=split, markersize=3)
        for step, stage in stage_starts:
            axis.axvline(step, color="grey", linestyle=":", linewidth=1)
            if key == panels[0][0]:
                axis.annotate(
                    f"stage {stage}",
                    (step, 1),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    va="top",
                    ha="left",
                    color="grey",
                )
        if key == "loss":
            _draw_probe(axis, records)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.suptitle(exp_dir.name)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _stage_starts(records: list[dict]) -> list[tuple[int, int]]:
    """(step, stage) where a staged run's stage changes: the step of the last train line
    of the stage before (the boundary lies between it and the next line)."""
    starts, previous = [], None
    for record in records:
        if record["split"] != "train" or "stage" not in record:
            continue
        if previous is not None and record["stage"] != previous[1]:
            starts.append((previous[0], record["stage"]))
        previous = (record["step"], record["stage"])
    return starts


def _draw_probe(axis, records: list[dict]) -> None:
    """The probe's WER and CER (%) against the step, on a second y axis of `axis`."""
    points = [r for r in records if r["split"] == "probe" and "probe_wer" in r]
    if not points:
        return
    right = axis.twinx()
    steps = [r["step"] for r in points]
    for key, style in (("probe_wer", "s--"), ("probe_cer", "^--")):
        right.plot(steps, [100 * r[key] for r in points], style, color="tab:red",
                   markersize=4, alpha=0.8 if key == "probe_wer" else 0.5, label=key)  # fmt: skip
    right.set_ylabel("probe error rate (%)", color="tab:red")
    right.legend(loc="upper center", fontsize=7)
