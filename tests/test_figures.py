import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mmlab import figures, report  # noqa: E402


def test_save_embeds_provenance(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    paths = figures.save(fig, "demo", params={"keep_ratio": 0.25}, runs=["a", "b"], sweep="s", directory=tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    for p in paths:
        meta = figures.provenance(p)
        assert meta["params"] == {"keep_ratio": 0.25} and meta["runs"] == ["a", "b"] and meta["sweep"] == "s"
        assert meta["git_commit"]


def test_bad_figure_name(tmp_path):
    with pytest.raises(ValueError, match="plain file stem"):
        figures.save(plt.figure(), "../x", directory=tmp_path)


def test_report_figures_rebuild_from_tables_alone(tmp_path):
    runs = tmp_path / "runs" / "baseline_random"
    runs.mkdir(parents=True)
    pd.DataFrame({"run_id": ["k=0.1", "k=1.0"], "status": ["ok", "ok"], "keep_ratio": [0.1, 1.0],
                  "accuracy": [0.5, 0.9], "acc_count": [0.3, 0.95]}).to_csv(runs / "results.csv", index=False)
    written = report.build_figures(tmp_path / "runs", tmp_path / "fig")
    assert {p.name for p in written} == {"baseline_random_accuracy.png", "baseline_random_accuracy.pdf"}
    assert figures.provenance(written[0])["runs"] == ["k=0.1", "k=1.0"]
    tables = report.write_tables(tmp_path / "runs", tmp_path / "tables")
    header = tables[0].read_text().splitlines()[4]
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["run_id", "status", "keep_ratio"]
