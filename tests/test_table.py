"""The benchmark table's scoring: DP's protocol over a run's rollouts, equal steps, time to a
score, the verdict column, and one tiny end-to-end run (slow)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import table  # noqa: E402

CURVE = [{"step": 100 * i, "train_seconds": 60.0 * i, "rollout_seconds": 6.0 * i, "score": s}
         for i, s in enumerate([0.1, 0.5, 0.4, 0.9, 0.7], start=1)]


def test_protocol_is_max_and_mean_of_the_last_k_rollouts():
    assert table.protocol(CURVE, k=2) == {"max": 0.9, "last_k": pytest.approx(0.8), "k": 2}
    # fewer rollouts than k: all of them, and k says how many
    assert table.protocol(CURVE, k=10) == {"max": 0.9, "last_k": pytest.approx(0.52), "k": 5}
    # equal steps: only the rollouts up to that step count
    assert table.protocol(CURVE, up_to_step=250, k=10) == {
        "max": 0.5, "last_k": pytest.approx(0.3), "k": 2}
    assert table.protocol(CURVE, up_to_step=50) is None


def test_time_to_reach_counts_training_and_evaluation():
    assert table.time_to_reach(CURVE, 0.5) == pytest.approx((120 + 12) / 60)
    assert table.time_to_reach(CURVE, 0.95) is None


def _row(policy, budget, mean, std):
    stats = {"mean": mean, "std": std}
    return {"task": "t", "policy": policy, "budget": budget, "score_max": stats,
            "score_last_k": stats, "metric": "mean_score", "train_steps": 10, "nfe": 1,
            "latency_ms": 1.0, "total_minutes_with_eval": 2.0, "time_to_target_minutes": None,
            "target": 0.5}


def test_verdict_and_generated_markdown(tmp_path):
    rows = [_row("drifting", "equal_time", 0.8, 0.02), _row("ddpm100", "equal_time", 0.6, 0.05),
            _row("drifting", "equal_steps", 0.6, 0.1), _row("ddpm100", "equal_steps", 0.65, 0.1)]
    assert table.verdict(rows, "t", "equal_time") == "above"
    assert table.verdict(rows, "t", "equal_steps") == "within spread"
    rows[0]["score_last_k"] = {"mean": 0.3, "std": 0.0}
    assert table.verdict(rows, "t", "equal_time") == "below"
    meta = {"machine": "x86_64", "tasks": {"t": {
        "seeds": 2, "n_test": 50, "minutes": 30, "rollouts_per_run": 10, "n_envs": 2, "last_k": 3,
        "command": "python table.py --tasks t"}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.README_BEGIN}\nold\n{table.README_END}\noutro\n")
    table.write_markdown({"rows": rows, "meta": meta}, tmp_path / "table.md", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| t | drifting | mean_score | 0.80 ± 0.02 / 0.30 ± 0.00 |" in text
    assert "below / within spread |" in text
    assert (tmp_path / "table.md").read_text() in text
    assert ("- t: 2 training seeds x 30 min of training, 10 rollouts of 50 test seeds "
            "(2 envs at once), last 3; `python table.py --tasks t`") in text


def test_merge_replaces_one_tasks_rows_and_keeps_tasks_in_table_order():
    def rows(task, policy="drifting"):
        return [{"task": task, "policy": policy, "budget": b}
                for b in ("equal_time", "equal_steps")]

    merged = {"rows": rows("pusht_lowdim") + rows("kitchen_lowdim"),
             "meta": {"tasks": {"pusht_lowdim": {"seeds": 2}, "kitchen_lowdim": {"seeds": 1}}}}
    merged = table.merge(merged, "can_lowdim", rows("can_lowdim"), {"seeds": 1})
    assert [r["task"] for r in merged["rows"]] == [
        t for t in ("pusht_lowdim", "can_lowdim", "kitchen_lowdim") for _ in range(2)]
    assert list(merged["meta"]["tasks"]) == ["pusht_lowdim", "can_lowdim", "kitchen_lowdim"]
    merged = table.merge(merged, "pusht_lowdim", rows("pusht_lowdim", "ddim10"), {"seeds": 3})
    assert [r["policy"] for r in merged["rows"][:2]] == ["ddim10", "ddim10"]
    assert len(merged["rows"]) == 6 and merged["meta"]["tasks"]["pusht_lowdim"] == {"seeds": 3}


def test_curves_figure_has_a_panel_per_task_with_curves(tmp_path):
    rows = [{**_row(policy, "equal_time", 0.5, 0.1), "task": task, "per_seed": [
        {"curve": [[1.0, 0.1], [2.0, 0.4 + i]]} for i in (0.0, 0.1)]}
        for task in ("a", "b") for policy in ("drifting", "ddpm100")]
    rows.append({**_row("ddpm100", "equal_time", 0.5, 0.1), "task": "c",  # final-only scores
                 "per_seed": [{"curve": [], "total_minutes": 3.0,
                               "equal_time": {"max": 0.6, "last_k": 0.6, "k": 1}}]})
    rows.append({**rows[-1], "task": "a", "policy": "ddpm100_final"})  # a marker in panel a
    table.plot_curves({"rows": rows}, tmp_path / "curves.png")
    from PIL import Image
    width, height = Image.open(tmp_path / "curves.png").size
    assert (width, height) == (2 * 4.2 * 80, 3.2 * 80)  # two panels: task c has no curve
    table.plot_curves({"rows": rows[-1:]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


class FakeWorkspace:
    """Stands in for TrainWorkspace: records its config, 'trains' at 0.5 s per step until
    num_steps or the time budget (resuming: from a previous attempt's second checkpoint),
    logging a rollout every rollout_every steps."""

    configs: list = []

    def __init__(self, cfg):
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        FakeWorkspace.configs.append(cfg)
        self.step = 2 * cfg.training.rollout_every if cfg.resume else 0
        self.train_seconds = self.rollout_seconds = 0.5 * self.step

    def run(self):
        t = self.cfg.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "logs.jsonl", "a") as f:
            while self.step < t.num_steps and self.train_seconds < 60 * t.max_minutes:
                self.step += t.rollout_every
                self.train_seconds += 0.5 * t.rollout_every
                self.rollout_seconds += 1.0
                f.write(json.dumps({"step": self.step, "train_seconds": self.train_seconds,
                                    "rollout_seconds": self.rollout_seconds,
                                    "test/mean_score": self.step / t.num_steps}) + "\n")


def test_runs_keep_their_plan_resume_and_are_read_back_when_finished(tmp_path, monkeypatch):
    probes = []
    monkeypatch.setattr(table, "seconds_per_step", lambda *a: probes.append(a) or 0.4)
    monkeypatch.setattr(table, "TrainWorkspace", FakeWorkspace)
    FakeWorkspace.configs = []
    args = table.argparse.Namespace(work=tmp_path, rollouts=4, n_test=2, n_envs=1, size="cpu",
                                    overrides=[], periodic_sampler="ddim10")
    spec = table.TASKS["pusht_lowdim"]
    first = table.train("pusht_lowdim", spec, "drifting", 42, 1.0, args)
    run_dir = tmp_path / "pusht_lowdim" / "drifting_seed42"
    # planned 60 s / 0.4 s per step = 150 steps: 4 rollouts of 37 steps, the last at the end
    assert (first["planned_steps"], first["steps"], len(probes)) == (150, 148, 1)
    assert [c["step"] for c in first["curve"]] == [37, 74, 111, 148]
    assert first["curve"][-1]["score"] == pytest.approx(1.0)
    cfg = FakeWorkspace.configs[-1]
    assert (cfg.training.num_steps, cfg.training.rollout_every, cfg.resume) == (148, 37, False)
    assert table.train("pusht_lowdim", spec, "drifting", 42, 1.0, args) == first
    assert len(FakeWorkspace.configs) == 1  # a finished run is read back, not trained
    # interrupted: no run.json, a checkpoint to continue from; the machine got slower since
    (run_dir / "run.json").unlink()
    (run_dir / "checkpoints" / "latest").mkdir(parents=True)
    monkeypatch.setattr(table, "seconds_per_step", lambda *a: probes.append(a) or 5.0)
    again = table.train("pusht_lowdim", spec, "drifting", 42, 1.0, args)
    cfg = FakeWorkspace.configs[-1]
    assert (cfg.training.num_steps, cfg.resume, len(probes)) == (148, True, 1)  # same plan
    assert again["steps"] == 148 and again["seconds_per_step"] == 0.4
    # another seed plans with the finished run's measured step time (0.5 s), not a probe
    probes.clear()
    other = table.train("pusht_lowdim", spec, "drifting", 43, 1.0, args)
    assert (other["planned_steps"], other["seconds_per_step"], probes) == (120, 0.5, [])
    # a diffusion run continues with the periodic sampler it started with, or not at all
    table.train("pusht_lowdim", spec, "diffusion", 42, 1.0, args)
    assert FakeWorkspace.configs[-1].policy.num_inference_steps == 10  # DDIM-10 rollouts
    diffusion = tmp_path / "pusht_lowdim" / "diffusion_seed42"
    (diffusion / "run.json").unlink()
    (diffusion / "checkpoints" / "latest").mkdir(parents=True)
    args.periodic_sampler = "ddpm100"
    with pytest.raises(SystemExit, match="started with --periodic-sampler ddim10"):
        table.train("pusht_lowdim", spec, "diffusion", 42, 1.0, args)


def test_final_scores_are_kept_per_sampler_and_read_back(tmp_path, monkeypatch):
    calls = []

    def evaluate(checkpoint, out, n_test, **kw):
        calls.append(n_test)
        out.mkdir(parents=True, exist_ok=True)
        result = {"mean_score": 0.25 * n_test, "n_test": n_test, "eval_seconds": 3.0 * n_test}
        (out / "eval.json").write_text(json.dumps(result))
        return result
    monkeypatch.setattr(table, "evaluate", evaluate)
    run = {"run_dir": tmp_path}
    args = table.argparse.Namespace(n_test=2, n_envs=1)
    assert table.final_score(run, None, "ddpm100", "mean_score", args) == (0.5, 6.0)
    assert (tmp_path / "eval_final_ddpm100" / "eval.json").is_file() and calls == [2]
    assert table.final_score(run, None, "ddpm100", "mean_score", args) == (0.5, 6.0)
    assert calls == [2]  # read back, not evaluated again
    args.n_test = 3  # a different number of test seeds is evaluated anew
    assert table.final_score(run, None, "ddpm100", "mean_score", args) == (0.75, 9.0)
    assert calls == [2, 3]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_table_run_writes_the_contract_json(tmp_path, monkeypatch):
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", [
        "table.py", "--tasks", "pusht_lowdim", "--minutes", "0.1", "--seeds", "1",
        "--rollouts", "2", "--n-test", "2", "--n-envs", "1", "--work", str(tmp_path / "w"),
        "--jobs", "2",  # drifting and diffusion side by side, in child processes
        "--out", str(out), "--readme", str(tmp_path / "README.md"),
        f"task.dataset.path={tmp_path / 'pusht.zarr'}", "task.env.max_steps=20",
        "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16"])
    monkeypatch.setitem(table.TASKS, "pusht_lowdim", dataclasses.replace(
        table.TASKS["pusht_lowdim"], demos=("pusht", "--episodes", "4")))
    assert table.main() == 0
    rows = json.loads(out.read_text())["rows"]
    assert (tmp_path / "table_curves.png").stat().st_size > 5_000
    assert {(r["policy"], r["budget"]) for r in rows} == {  # DDIM-10 periodic, DDPM-100 final
        (p, b) for p in ("drifting", "ddim10", "ddpm100") for b in ("equal_time", "equal_steps")}
    final = next(r for r in rows if r["policy"] == "ddpm100")
    assert final["k"] == 1 and final["nfe"] == 100
    for r in rows:
        assert {"seeds", "score_max", "score_last_k", "k", "metric", "train_minutes",
                "train_steps", "nfe", "latency_ms"} <= set(r)
        if r["budget"] == "equal_time":  # equal steps may have no rollout that early: None
            assert 0 <= r["score_last_k"]["mean"] <= 1 and r["k"] >= 1
