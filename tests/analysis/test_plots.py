"""Training curves with matplotlib: smoothing by hand, readable log ticks, the PNGs tools/plot.py writes."""

from __future__ import annotations

import json

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from detkit.analysis.plots import losses_figure, metric_series, plot_metrics, smooth


def test_smooth_is_a_trailing_mean_that_starts_at_the_first_value():
    values = np.array([4.0, 2.0, 6.0, 0.0, 8.0])
    np.testing.assert_allclose(smooth(values, window=2), [4.0, 3.0, 4.0, 3.0, 4.0])
    np.testing.assert_allclose(smooth(values, window=3), [4.0, 3.0, 4.0, 8 / 3, 14 / 3])
    assert smooth(np.zeros(0)).size == 0


def test_metric_series_skips_rows_without_a_finite_number():
    rows = [
        {"iteration": 1, "lr": 0.1},
        {"iteration": 2},
        {"iteration": 3, "lr": None},
        {"iteration": 4, "lr": float("nan")},
        {"iteration": 5, "lr": True},
        {"iteration": 6, "lr": 0.2},
    ]
    xs, ys = metric_series(rows, "lr")
    assert xs.tolist() == [1, 6] and ys.tolist() == [0.1, 0.2]


def test_loss_axis_ticks_are_one_two_five_times_powers_of_ten():
    iterations = np.arange(20, 320, 20)
    rows = [
        {"iteration": int(i), "total_loss": 2.15 * np.exp(-i / 150), "loss_rpn_loc": 0.105 * np.exp(-i / 100)}
        for i in iterations
    ]
    fig = losses_figure(rows)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    labels = [t.get_text() for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= v <= high]
    # The data spans 0.0052 .. 1.88: every label is a plain 1/2/5 x 10^k number (not 2.15 / 0.474 / 0.105).
    assert labels == ["0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["total_loss", "loss_rpn_loc"]


def test_plot_metrics_writes_three_pngs(tmp_path):
    rows = [{"iteration": i, "total_loss": 1.0 / i, "loss_cls": 0.5 / i, "lr": 0.01} for i in range(1, 30)]
    rows.append({"iteration": 29, "bbox/AP": 12.5, "bbox/AP50": 30.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "out")
    assert [p.name for p in written] == ["losses.png", "lr.png", "eval.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eval.png",
        "losses.png",
        "lr.png",
    ]  # no temp file left
