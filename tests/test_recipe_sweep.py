"""The recipe sweep: its cells, the overrides it trains with, its scoring, resuming, and one
tiny end-to-end run (slow)."""

import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_sweep  # noqa: E402


def test_recipes_cover_groupings_normalisations_and_g_with_flat_once():
    got = recipe_sweep.recipes((2, 4, 8))
    assert len(got) == len(set(got)) == 15  # (2 x 2 + 1) x 3
    assert {g for *_, g in got} == {2, 4, 8}
    assert ("flat", "global", 2) not in got and ("flat", "per_group", 2) in got
    assert ("per_dim", "global", 8) in got and ("per_timestep", "per_group", 4) in got
    cells = recipe_sweep.cells(["pusht_lowdim", "can_lowdim"], (2,), seeds=2)
    assert len(cells) == 2 * 5 * 2 and {c.seed for c in cells} == {42, 43}


def test_axes_design_varies_one_factor_at_a_time_around_each_tasks_default():
    default = recipe_sweep.default_recipe("pusht_lowdim")
    assert default == ("per_timestep", "per_group", 8)  # configs/task/_base.yaml drift_loss
    got = recipe_sweep.axes((2, 4, 8), default)
    assert got == [("per_timestep", "per_group", 8), ("per_timestep", "global", 8),
                   ("per_dim", "per_group", 8), ("per_dim", "global", 8),
                   ("flat", "per_group", 8),
                   ("per_timestep", "per_group", 2), ("per_timestep", "per_group", 4)]
    cells = recipe_sweep.cells(["pusht_lowdim", "can_lowdim"], (2, 4, 8), seeds=2, defaults={
        "pusht_lowdim": default, "can_lowdim": ("per_dim", "global", 4)})
    assert [(c.recipe, c.seed) for c in cells[:2]] == [
        ("per_timestep/per_group/G8", 42), ("per_timestep/per_group/G8", 43)]
    can = [c.recipe for c in cells if c.task == "can_lowdim"][::2]
    assert can[:5] == [f"{g}/{n}/G4" for g, n, _ in recipe_sweep.recipes((4,))]
    assert can[5:] == ["per_dim/global/G2", "per_dim/global/G8"]
    assert len(cells) == 2 * 7 * 2 and set(cells) < set(recipe_sweep.cells(
        ["pusht_lowdim", "can_lowdim"], (2, 4, 8), seeds=2))


def _args(tmp_path, *extra):
    data = tmp_path / "pusht.zarr"
    data.mkdir(parents=True, exist_ok=True)  # an existing dataset: no demos are generated
    return ["--tasks", "pusht_lowdim", "--gs", "2,4", "--seeds", "2", "--steps", "100",
            "--rollouts", "4", "--last-k", "2", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "sweep.json"), *extra, f"task.dataset.path={data}"]


class FakeTrainer:
    """Stands in for `drifting-policy train`: records the overrides and writes the run's logs
    (4 rollouts and validations whose values depend on the recipe and the seed)."""

    def __init__(self):
        self.calls = []

    def __call__(self, overrides, log):
        kv = dict(o.split("=", 1) for o in overrides)
        self.calls.append(kv)
        run_dir = Path(kv["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        quality = {"per_timestep": 0.6, "per_dim": 0.5, "flat": 0.2}[kv["policy.grouping"]]
        quality += 0.05 * (kv["policy.normalize"] == "per_group") + 0.01 * int(kv["seed"])
        quality -= 0.1 * (kv["policy.gen_per_obs"] == "2")
        with open(run_dir / "logs.jsonl", "w") as f:
            for i, s in enumerate((0.2, 0.9, 0.6, 0.8), start=1):
                f.write(json.dumps({"step": 25 * i, "train/loss": 1.0}) + "\n")
                f.write(json.dumps({"step": 25 * i, "test/mean_score": round(s * quality, 6),
                                    "val/action_mse": 0.1 / (i * quality)}) + "\n")


def test_cells_train_through_overrides_and_are_scored_by_dp_protocol(tmp_path):
    fake = FakeTrainer()
    assert recipe_sweep.main(_args(tmp_path), train=fake) == 0
    assert len(fake.calls) == 20
    kv = fake.calls[0]
    assert (kv["policy.grouping"], kv["policy.normalize"], kv["policy.gen_per_obs"]) == (
        "per_timestep", "per_group", "2")
    assert (kv["training.num_steps"], kv["training.rollout_every"], kv["resume"]) == (
        "100", "25", "false")
    assert kv["training.val_every"] == "25" and kv["task"] == "pusht_lowdim"
    out = json.loads((tmp_path / "sweep.json").read_text())
    assert len(out["cells"]) == 20 and len(out["summary"]) == 10
    row = next(r for r in out["summary"] if r["recipe"] == "per_dim/global/G4")
    # seed 42 / 43: quality 0.92 / 0.93; max = 0.9 q, mean of the last 2 = 0.7 q
    assert row["score_max"]["mean"] == pytest.approx(0.9 * 0.925, abs=1e-6)
    assert row["score_last_k"]["mean"] == pytest.approx(0.7 * 0.925, abs=1e-6)
    assert row["score_last_k"]["std"] == pytest.approx(0.7 * 0.005, abs=1e-6)
    assert row["val_action_mse"]["mean"] == pytest.approx(
        (0.1 / (4 * 0.92) + 0.1 / (4 * 0.93)) / 2)
    assert row["k"] == 2 and row["seeds"] == [42, 43]
    assert out["best"]["pusht_lowdim"]["recipe"] == "per_timestep/per_group/G4"
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_best_recipe_lists_those_whose_seed_spread_overlaps_it():
    def row(recipe, mean, std, mse=0.1):
        return {"task": "t", "recipe": recipe, "score_last_k": {"mean": mean, "std": std},
                "val_action_mse": {"mean": mse, "std": 0.0}}

    rows = [row("a", 0.50, 0.05), row("b", 0.42, 0.04), row("c", 0.40, 0.04),
            row("d", 0.02, 0.01), row("e", 0.50, 0.05, mse=0.05), row("f", None, None)]
    rows[-1]["score_last_k"] = None  # no rollout yet: not ranked
    best = recipe_sweep.best_recipes(rows)["t"]
    # a tie on score goes to the lower val MSE; b's 0.46 reaches a's 0.45, c's 0.44 does not
    assert best["recipe"] == "e" and best["within_one_std"] == ["a", "b"]
    # scores at the noise floor (BlockPush at 1,500 steps) are all indistinguishable, float
    # rounding included (0.02 - 0.01 vs 0.01 + 0.0)
    floor = [row("g4", 0.02, 0.01), row("g8", 0.01, 0.0), row("g2", 0.005, 0.005)]
    assert recipe_sweep.best_recipes(floor)["t"]["within_one_std"] == ["g8", "g2"]


def test_finished_cells_are_skipped_and_interrupted_ones_resume(tmp_path):
    fake = FakeTrainer()
    recipe_sweep.main(_args(tmp_path), train=fake)
    first = json.loads((tmp_path / "sweep.json").read_text())
    # one cell interrupted: no cell.json, but a checkpoint to continue from
    cell = recipe_sweep.Cell("pusht_lowdim", "per_dim", "global", 4, 43)
    run_dir = cell.run_dir(tmp_path / "work")
    (run_dir / "cell.json").unlink()
    (run_dir / "checkpoints" / "latest").mkdir(parents=True)
    again = FakeTrainer()
    recipe_sweep.main(_args(tmp_path), train=again)
    assert [(c["run_dir"], c["resume"]) for c in again.calls] == [(str(run_dir), "true")]
    assert json.loads((tmp_path / "sweep.json").read_text())["summary"] == first["summary"]


def test_tasks_swept_in_separate_sittings_share_one_json(tmp_path):
    recipe_sweep.main(_args(tmp_path), train=FakeTrainer())
    pusht = json.loads((tmp_path / "sweep.json").read_text())
    recipe_sweep.main(_args(tmp_path, "--tasks", "can_lowdim", "--gs", "4"), train=FakeTrainer())
    both = json.loads((tmp_path / "sweep.json").read_text())
    assert [c for c in both["cells"] if c["task"] == "pusht_lowdim"] == pusht["cells"]
    assert {c["task"] for c in both["cells"]} == {"pusht_lowdim", "can_lowdim"}
    assert len(both["cells"]) == 20 + 10 and set(both["best"]) == {"pusht_lowdim", "can_lowdim"}
    tasks = both["meta"]["tasks"]
    assert tasks["pusht_lowdim"]["gen_per_obs"] == [2, 4]
    assert tasks["can_lowdim"]["gen_per_obs"] == [4]


def test_parallel_jobs_train_cells_at_once_with_a_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "unset")  # restored after the test
    serial = FakeTrainer()
    recipe_sweep.main(_args(tmp_path / "serial"), train=serial)
    barrier, threads = threading.Barrier(4, timeout=20), []

    class Concurrent(FakeTrainer):
        def __call__(self, overrides, log):
            threads.append(os.environ["OMP_NUM_THREADS"])
            barrier.wait()  # breaks (and fails the sweep) unless 4 cells run at once
            super().__call__(overrides, log)

    parallel = Concurrent()
    assert recipe_sweep.main(_args(tmp_path / "parallel", "--jobs", "4"), train=parallel) == 0
    assert len(parallel.calls) == 20
    assert set(threads) == {str(max(1, (os.cpu_count() or 1) // 4))}
    one, four = (json.loads((tmp_path / d / "sweep.json").read_text())
                  for d in ("serial", "parallel"))
    assert four["summary"] == one["summary"] and four["best"] == one["best"]
    assert [c["recipe"] for c in four["cells"]] == [c["recipe"] for c in one["cells"]]


def test_bad_arguments_exit_with_a_message(capsys):
    for argv, match in ((["--tasks", "pusht"], "unknown"), (["--gs", "two"], "--gs"),
                        (["--gs", "0"], "G >= 1"), (["--steps", "lift_lowdim=10"], "--steps"),
                        (["--jobs", "0"], "--jobs")):
        with pytest.raises(SystemExit):
            recipe_sweep.parse_args(argv)
        assert match in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_sweep_end_to_end(tmp_path):
    """--quick: 3 PushT demos, the 5 recipes at G = 2, 4 steps each through the real
    `drifting-policy train`, a 10-step rollout each; rerunning trains nothing."""
    argv = ["--quick", "--work", str(tmp_path / "quick")]
    assert recipe_sweep.main(argv) == 0
    out = json.loads((tmp_path / "quick" / "recipe_sweep.json").read_text())
    assert len(out["cells"]) == 5 and out["meta"]["tasks"]["pusht_lowdim"]["quick"]
    for cell in out["cells"]:
        assert cell["steps"] == 4 and cell["protocol"]["k"] == 1
        assert 0.0 <= cell["protocol"]["max"] <= 1.0 and cell["val_action_mse"] > 0
    assert (tmp_path / "quick" / "recipe_sweep.png").is_file()

    def no_training(overrides, log):
        raise AssertionError("a finished cell was trained again")
    assert recipe_sweep.main(argv, train=no_training) == 0
