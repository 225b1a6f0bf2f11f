"""The per-pair bars (clif/eval/figures.py): what is drawn, methods merged across 'METHOD:...' labels, the PNG."""

from __future__ import annotations

from PIL import Image

from clif.eval.figures import bar_values, metric_bars, pair_bars


def test_bar_values_merge_labels_and_skip_empty_pairs():
    per_pair = {
        "clif:dog-dog2": [{"pair": ["dog", "dog2"], "images": 4, "dc": 0.7, "confusion_rate": 0.25}],
        "clif:cat-cat2": [{"pair": ["cat", "cat2"], "images": 4, "dc": 0.5, "confusion_rate": None},
                          {"pair": ["dog2", "dog6"], "images": 0}],
        "ti": [{"pair": ["dog", "dog2"], "images": 4, "dc": -0.1, "confusion_rate": 0.5}],
    }
    methods, pairs, panels, value = bar_values(per_pair)
    assert methods == ["clif", "ti"] and pairs == [("cat", "cat2"), ("dog", "dog2")]
    assert [k for k, _ in panels] == ["dc", "confusion_rate"]
    assert value[("clif", ("dog", "dog2"), "dc")] == 0.7 and value[("clif", ("cat", "cat2"), "dc")] == 0.5
    assert value[("ti", ("dog", "dog2"), "confusion_rate")] == 0.5 and ("ti", ("cat", "cat2"), "dc") not in value
    assert value[("clif", ("cat", "cat2"), "confusion_rate")] is None


def test_pair_bars_png(tmp_path):
    assert pair_bars({"a": [{"pair": ["x", "y"], "images": 0}]}, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
    ok = pair_bars({"a": [{"pair": ["x", "y"], "images": 2, "dc": -0.2}], "b": [{"pair": ["x", "y"], "images": 2,
                                                                                 "dc": 0.8}]}, tmp_path / "p.png")
    assert ok and Image.open(tmp_path / "p.png").size[0] >= 500


def test_metrics_png_is_matplotlib_with_readable_labels(tmp_path):
    """metrics.png's labels keep their spaces (PIL's drawing once wrote 'textalignment'); values are scaled."""
    from clif.eval.report import write_report

    summary = {"images": 2, "text_alignment": 2.0, "image_alignment": 0.5, "confusion_rate": None}
    results = {"clif": {"summary": summary, "per_prompt": []},
               "ti": {"summary": {**summary, "confusion_rate": 0.25}, "per_prompt": []}}
    fig = metric_bars(results, ["text_alignment", "image_alignment", "confusion_rate"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["text alignment / 2.5", "image alignment",
                                                            "confusion rate"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["clif", "ti"]
    assert abs(ax.patches[0].get_height() - 0.8) < 1e-9  # 2.0 / 2.5
    write_report(tmp_path, results)
    assert Image.open(tmp_path / "metrics.png").format == "PNG"
