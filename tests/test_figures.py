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
    header = next(ln for ln in tables[0].read_text().splitlines() if ln.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")][:3] == ["run_id", "status", "keep_ratio"]


def _sweep_table(root, n_samples, status=("ok", "ok"), error=(None, None)):
    runs = root / "baseline_random"
    runs.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"run_id": ["k=0.1", "k=1.0"], "status": list(status), "error": list(error),
                  "keep_ratio": [0.1, 1.0], "n_samples": [n_samples] * 2, "accuracy": [0.5, None],
                  "acc_count": [0.3, None]}).to_csv(runs / "results.csv", index=False)


def test_fewer_samples_never_overwrite_without_force(tmp_path, capsys):
    """A toy sweep (20 samples) does not replace results made from 400 unless asked; tables and figures
    state their samples; a failed run is a row with its error."""
    _sweep_table(tmp_path / "big", 400)
    assert len(report.write_tables(tmp_path / "big", tmp_path / "out")) == 1
    assert len(report.build_figures(tmp_path / "big", tmp_path / "out")) == 2
    assert figures.provenance(tmp_path / "out" / "baseline_random_accuracy.png")["params"]["n_samples"] == 400
    _sweep_table(tmp_path / "toy", 20, status=("ok", "failed"), error=(None, "RuntimeError: boom"))
    assert report.write_tables(tmp_path / "toy", tmp_path / "out") == []
    assert report.build_figures(tmp_path / "toy", tmp_path / "out") == []
    assert capsys.readouterr().out.count("keep ") == 2
    assert "n_samples = 400" in (tmp_path / "out" / "baseline_random.md").read_text()
    (p,) = report.write_tables(tmp_path / "toy", tmp_path / "out", force=True)
    text = p.read_text()
    assert "2 runs (1 ok, 1 failed; 2 rows), n_samples = 20" in text and "RuntimeError: boom" in text
    assert "nan" not in text


def test_provenance_of_a_foreign_file_is_one_line(tmp_path):
    fig, ax = plt.subplots()
    fig.savefig(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="has no mmlab provenance"):
        figures.provenance(tmp_path / "plain.png")
