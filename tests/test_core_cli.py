import json

from typer.testing import CliRunner

from poe_core.cli import app


def test_query_json_summary_states_the_delivered_model(pool, tmp_path):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(app, ["query", "--pool", str(pool.root), "-t", "task2", "-c", "class0_1",
                                 "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    q = pool.query(["task2"], ["class0_1"])
    assert summary["labels"] == ["class2_0", "class2_1", "class0_1"] and summary["tasks"] == ["task2", "task0"]
    assert summary["val_acc"] == pool.accuracy(q) and summary["params"] == pool.params(q)
    assert summary["bytes"] == out.stat().st_size
    assert summary["reject"] == pool.reject_rule(q).to_dict()


def test_query_summary_is_one_line_when_not_on_a_terminal(pool, tmp_path):
    r = CliRunner().invoke(app, ["query", "--pool", str(pool.root), "-t", "task0", "task1", "task2",
                                 "-o", str(tmp_path / "m.onnx"), "--method", "mask"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip()
    assert len(line) > 120 and "\n" not in line and "(mask)" in line


def test_eval_json(pool):
    r = CliRunner().invoke(app, ["eval", "--pool", str(pool.root), "-t", "task1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pool.composite_accuracy(["task1"])
