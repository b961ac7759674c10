"""Recipe sweep: how the drift loss splits an action chunk, measured side by side.

Every cell trains a drifting policy for the same number of optimiser steps through
`drifting-policy train` overrides, one process per cell:

    policy.grouping=per_timestep|per_dim|flat  policy.normalize=per_group|global
    policy.gen_per_obs=G (2, 4, 8)  seed=42, 43, ...

on PushT, Lift and Can from state and on BlockPush. flat has one group, so its two
normalisations are the same computation: it is run once (recorded as per_group). Scores follow
Diffusion Policy: the EMA policy is rolled out on the held-out test seeds (task.runner's
test_start_seed + i) --rollouts times, evenly spaced; a run scores the max and the mean of its
last k rollouts of the task's metric (mean_score; p1 on BlockPush, as in benchmarks/table.py),
and the validation action MSE of the final weights. Each recipe reports mean +- std over seeds.

    python benchmarks/recipe_sweep.py                        # the full sweep (many CPU hours)
    python benchmarks/recipe_sweep.py --tasks pusht_lowdim --seeds 2 --steps 3000
    python benchmarks/recipe_sweep.py --steps pusht_lowdim=3000,blockpush_lowdim=5000
    python benchmarks/recipe_sweep.py --design axes          # one factor at a time (7 recipes)
    python benchmarks/recipe_sweep.py --quick                # smoke run: PushT, tiny budget
    python benchmarks/recipe_sweep.py --list                 # cells and whether they are done

Parallel: --jobs N trains N cells at once, each process with cores / N threads (on a 2-core
machine two one-thread jobs give ~1.4x the cells per hour of one two-thread job). Equal steps
makes the scores independent of how busy the machine is.

Resumable: a finished cell (run_dir/cell.json) is skipped; an interrupted one continues from
its last checkpoint (resume=true). The JSON is rewritten after every cell; the figure at the end.
Writes benchmarks/results/recipe_sweep.json and recipe_sweep.png (--quick: under --work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from compare import summarise
from table import TASKS, _per_task, ensure_demos, protocol

from drifting_policy.config import compose
from drifting_policy.persist import atomic_path
from drifting_policy.plots import read_logs

SWEEP_TASKS = ("pusht_lowdim", "lift_lowdim", "can_lowdim", "blockpush_lowdim")
GROUPINGS = ("per_timestep", "per_dim", "flat")
NORMALIZATIONS = ("per_group", "global")
GEN_PER_OBS = (2, 4, 8)
RESULTS = Path("benchmarks/results")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of the sweep."""

    task: str
    grouping: str
    normalize: str
    gen_per_obs: int
    seed: int

    @property
    def recipe(self) -> str:
        return f"{self.grouping}/{self.normalize}/G{self.gen_per_obs}"

    def run_dir(self, work: Path) -> Path:
        return (work / self.task / f"{self.grouping}-{self.normalize}-G{self.gen_per_obs}"
                / f"seed{self.seed}")


def recipes(gs: tuple[int, ...]) -> list[tuple[str, str, int]]:
    """(grouping, normalize, G) of every recipe; flat only once (one group: no difference)."""
    return [(grouping, normalize, g) for g in gs for grouping in GROUPINGS
            for normalize in NORMALIZATIONS if not (grouping == "flat" and normalize == "global")]


def axes(gs: tuple[int, ...], default: tuple[str, str, int]) -> list[tuple[str, str, int]]:
    """One factor at a time around the `default` recipe (grouping, normalize, G): every
    grouping x normalize at the default G, then every G in `gs` with the default grouping and
    normalisation (each recipe once)."""
    grouping, normalize, g_default = default
    around = recipes((g_default,))
    return around + [(grouping, normalize, g) for g in gs if (grouping, normalize, g) not in around]


def cells(tasks: list[str], gs: tuple[int, ...], seeds: int,
          defaults: dict[str, tuple[str, str, int]] | None = None) -> list[Cell]:
    """The sweep's runs: the full factorial of recipes(gs), or (`defaults` given: each task's
    configured recipe) the axes around each task's default."""
    return [Cell(task, grouping, normalize, g, 42 + i) for task in tasks
            for grouping, normalize, g in (recipes(gs) if defaults is None
                                           else axes(gs, defaults[task]))
            for i in range(seeds)]


def default_recipe(task: str) -> tuple[str, str, int]:
    """The task's configured drifting-loss recipe (task.drift_loss): grouping, normalize, G."""
    policy = compose("train_policy", [f"task={task}", "policy=drifting"]).policy
    return policy.grouping, policy.normalize, int(policy.gen_per_obs)


def train_overrides(cell: Cell, run_dir: Path, steps: int, args, resume: bool) -> list[str]:
    """`drifting-policy train` overrides of one cell: equal steps, evenly spaced rollouts (and
    validation and checkpoints with them), the final weights rolled out too."""
    every = max(steps // args.rollouts, 1)
    return [
        f"task={cell.task}", "policy=drifting", f"size={args.size}", f"seed={cell.seed}",
        f"run_dir={run_dir}", f"resume={str(resume).lower()}",
        f"policy.grouping={cell.grouping}", f"policy.normalize={cell.normalize}",
        f"policy.gen_per_obs={cell.gen_per_obs}",
        f"training.num_steps={steps}", "training.max_minutes=null",
        f"training.rollout_every={every}", f"training.val_every={every}",
        f"training.checkpoint_every={every}", "training.final_rollout=true",
        f"training.score_last_k={args.last_k}", f"training.rollout.n_test={args.n_test}",
        "training.rollout.n_videos=0", f"task.runner.n_envs={args.n_envs}",
        "logging.mode=disabled", *args.overrides,
    ]


def launch(overrides: list[str], log: Path) -> None:
    """Train in a fresh process (`python -m drifting_policy.cli train ...`); output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, "-m", "drifting_policy.cli", "train", *overrides],
                              stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"training failed (exit {done.returncode}); {log}:\n{tail}")


def score_run(logs: Path, metric: str, last_k: int) -> dict:
    """DP's protocol over a run's rollouts of `metric`, and its last validation action MSE."""
    records = read_logs(logs)
    curve = [{"step": r["step"], "score": r[f"test/{metric}"]}
             for r in records if f"test/{metric}" in r]
    mse = [r["val/action_mse"] for r in records if "val/action_mse" in r]
    return {"protocol": protocol(curve, k=last_k), "val_action_mse": mse[-1] if mse else None,
            "curve": curve, "steps": max((r["step"] for r in records), default=0)}


def status(cell: Cell, work: Path) -> str:
    """'done' (cell.json written), 'partial' (a checkpoint to resume from) or 'todo'."""
    run_dir = cell.run_dir(work)
    if (run_dir / "cell.json").is_file():
        return "done"
    return "partial" if (run_dir / "checkpoints" / "latest").exists() else "todo"


def run_cell(cell: Cell, steps: int, args, train=launch) -> dict:
    """Train (or resume) one cell, score it and store the result in its cell.json."""
    run_dir = cell.run_dir(args.work)
    resume = status(cell, args.work) == "partial"
    train(train_overrides(cell, run_dir, steps, args, resume), run_dir / "train.log")
    metric = TASKS[cell.task].metric
    result = {**dataclasses.asdict(cell), "recipe": cell.recipe, "metric": metric,
              "target_steps": steps, **score_run(run_dir / "logs.jsonl", metric, args.last_k)}
    (run_dir / "cell.json").write_text(json.dumps(result, indent=1))
    return result


def summary_rows(results: list[dict]) -> list[dict]:
    """Per task x recipe: mean +- std over seeds of max, mean of last k and val action MSE."""
    rows = []
    for task, recipe in dict.fromkeys((r["task"], r["recipe"]) for r in results):
        mine = [r for r in results if (r["task"], r["recipe"]) == (task, recipe)]
        flat = [{"policy": recipe, "score_max": (r["protocol"] or {}).get("max"),
                 "score_last_k": (r["protocol"] or {}).get("last_k"),
                 "val_action_mse": r["val_action_mse"]} for r in mine]
        stats = summarise(flat, ["score_max", "score_last_k", "val_action_mse"])[recipe]
        first = mine[0]
        rows.append({"task": task, "recipe": recipe, "grouping": first["grouping"],
                     "normalize": first["normalize"], "gen_per_obs": first["gen_per_obs"],
                     "metric": first["metric"], "seeds": [r["seed"] for r in mine],
                     "k": min(((r["protocol"] or {}).get("k", 0) for r in mine), default=0),
                     **{k: stats.get(k) for k in ("score_max", "score_last_k",
                                                  "val_action_mse")}})
    return rows


def best_recipes(rows: list[dict]) -> dict[str, dict]:
    """Per task: the recipe with the highest mean-of-last-k score (ties: lower val MSE), and
    `within_one_std`: the others whose mean +- std overlaps the best's (not distinguishable at
    these seeds)."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        scored = [r for r in rows if r["task"] == task and r["score_last_k"]]
        if not scored:
            continue

        def key(r):
            mse = r["val_action_mse"]["mean"] if r["val_action_mse"] else float("inf")
            return (-r["score_last_k"]["mean"], mse)
        best = min(scored, key=key)
        floor = best["score_last_k"]["mean"] - best["score_last_k"]["std"]
        out[task] = {"recipe": best["recipe"], "score_last_k": best["score_last_k"],
                     "within_one_std": [r["recipe"] for r in scored if r is not best and
                                        r["score_last_k"]["mean"] + r["score_last_k"]["std"]
                                        >= floor - 1e-9]}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Per task: mean-of-last-k score (on 0..1) and val action MSE of every recipe (bars: mean
    over seeds, whiskers: std), grouped by G."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(f"{r['grouping']}/{r['normalize']}" for r in rows))
    gs = sorted({r["gen_per_obs"] for r in rows})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 2.8 * len(tasks)), squeeze=False)
    width = 0.8 / len(names)
    for (ax_score, ax_mse), task in zip(axes, tasks):
        for i, name in enumerate(names):
            for ax, key in ((ax_score, "score_last_k"), (ax_mse, "val_action_mse")):
                xs, ys, es = [], [], []
                for j, g in enumerate(gs):
                    row = next((r for r in rows if r["task"] == task and r["gen_per_obs"] == g
                                and f"{r['grouping']}/{r['normalize']}" == name), None)
                    if row and row[key]:
                        xs.append(j + (i - (len(names) - 1) / 2) * width)
                        ys.append(row[key]["mean"])
                        es.append(row[key]["std"])
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=name, color=f"C{i}")
        first = next(r for r in rows if r["task"] == task)
        ax_score.set_ylabel(f"{task}\n{first['metric']}: mean of last {first['k']}")
        ax_mse.set_ylabel("val action MSE")
        ax_score.set_ylim(0, 1)  # every metric is a success fraction: near-zero stays small
        for ax in (ax_score, ax_mse):
            ax.set_xticks(range(len(gs)), [f"G = {g}" for g in gs])
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("drift-loss recipes at equal optimiser steps (mean +- std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


QUICK = dict(tasks="pusht_lowdim", gs="2", seeds=1, steps="4", rollouts=1, n_test=1, n_envs=1,
             episodes=3, overrides=["task.env.max_steps=10", "training.batch_size=4",
                                    "training.val_batches=1", "task.dataset.val_ratio=0.34",
                                    "training.lr_warmup_steps=1", "task.horizon=8",
                                    "task.n_action_steps=4"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", default=",".join(SWEEP_TASKS), help="comma-separated task names")
    p.add_argument("--gs", default=",".join(map(str, GEN_PER_OBS)), help="G values, e.g. 2,4,8")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per recipe (42, 43, ..)")
    p.add_argument("--steps", default="3000", help="optimiser steps: N (all) or task=N,task=N")
    p.add_argument("--rollouts", type=int, default=10, help="evenly spaced rollouts per run")
    p.add_argument("--last-k", type=int, default=10, help="DP's mean of the last k rollouts")
    p.add_argument("--n-test", type=int, default=50, help="held-out test seeds per rollout")
    p.add_argument("--n-envs", type=int, default=2)
    p.add_argument("--size", default="cpu")
    p.add_argument("--work", type=Path, default=None,
                   help="run directories (default outputs/recipe_sweep[_quick])")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/recipe_sweep.json; --quick: in --work)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: PushT on 3 demos, G = 2, one seed, 4 steps, 1 short rollout")
    p.add_argument("--design", choices=("factorial", "axes"), default="factorial",
                   help="factorial: grouping x normalize x G; axes: one factor at a time around "
                        "each task's configured recipe (task.drift_loss: grouping x normalize "
                        "at its G, then each G)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once")
    p.add_argument("--list", action="store_true", help="print the cells and their status only")
    p.add_argument("overrides", nargs="*", help="extra `drifting-policy train` overrides")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value if key != "overrides" else value + args.overrides)
    args.work = args.work or Path("outputs/recipe_sweep" + ("_quick" if args.quick else ""))
    args.out = args.out or (args.work / "recipe_sweep.json" if args.quick
                            else RESULTS / "recipe_sweep.json")
    args.task_list = args.tasks.split(",")
    unknown = sorted(set(args.task_list) - set(TASKS))
    if unknown:
        p.error(f"--tasks: unknown {unknown}; expected some of {sorted(TASKS)}")
    try:
        args.g_values = tuple(int(g) for g in args.gs.split(","))
    except ValueError:
        p.error(f"--gs: expected comma-separated integers, got {args.gs!r}")
    if min(args.g_values) < 1:
        p.error(f"--gs: expected G >= 1, got {args.gs!r}")
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, got {args.jobs}")
    steps = _per_task(args.steps, int, args.task_list)
    missing = [t for t in args.task_list if t not in steps]
    if missing:
        p.error(f"--steps: no step count for {missing}")
    args.steps_per_task = steps
    return args


def main(argv: list[str] | None = None, train=launch) -> int:
    args = parse_args(argv)
    todo = cells(args.task_list, args.g_values, args.seeds,
                 {t: default_recipe(t) for t in args.task_list} if args.design == "axes" else None)
    if args.list:
        for cell in todo:
            print(f"{status(cell, args.work):<8} {cell.task:<18} {cell.recipe:<24} "
                  f"seed {cell.seed}  {cell.run_dir(args.work)}")
        return 0
    data_overrides: dict[str, list[str]] = {}
    for task in args.task_list:
        spec, extra = TASKS[task], []
        if args.quick:  # a few demos of its own, never the full dataset's path
            suffix = Path(compose("train_policy", [f"task={task}"]).task.dataset.path).suffix
            path = args.work / "data" / f"{task}{suffix}"
            spec = dataclasses.replace(spec, demos=(spec.demos[0], "--episodes",
                                                    str(args.episodes), "--workers", "1"))
            extra = [f"task.dataset.path={path}"]
        ensure_demos(task, spec, extra + args.overrides)
        data_overrides[task] = extra
    results = [json.loads((c.run_dir(args.work) / "cell.json").read_text())
               for c in todo if status(c, args.work) == "done"]
    pending = [c for c in todo if status(c, args.work) != "done"]
    print(f"{len(results)} cells done, {len(pending)} to train ({args.jobs} at a time)", flush=True)
    if args.jobs > 1:  # the cells' processes inherit it; this process only waits
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))

    def train_one(cell: Cell) -> dict:
        cell_args = argparse.Namespace(**{**vars(args), "overrides":
                                          data_overrides[cell.task] + args.overrides})
        return run_cell(cell, args.steps_per_task[cell.task], cell_args, train)

    order = {cell: i for i, cell in enumerate(todo)}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_one, cell): cell for cell in pending}
        for future in as_completed(futures):
            cell = futures[future]
            results.append(future.result())
            results.sort(key=lambda r: order[Cell(r["task"], r["grouping"], r["normalize"],
                                                  r["gen_per_obs"], r["seed"])])
            print(f"[done] {cell.task} {cell.recipe} seed {cell.seed} "
                  f"({len(results)}/{len(todo)})", flush=True)
            write(results, args)
    rows = write(results, args)
    plot(rows, args.out.with_suffix(".png"))
    print_table(rows)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def write(results: list[dict], args) -> list[dict]:
    """The sweep's JSON (cells, per-recipe summary, best recipe per task); returns the rows.
    Tasks this invocation does not sweep keep their cells and settings from the existing file,
    so tasks can be swept in separate sittings into one JSON."""
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = [c for c in old.get("cells", []) if c["task"] not in args.task_list]
    settings = {"design": args.design, "gen_per_obs": list(args.g_values), "seeds": args.seeds,
                "rollouts_per_run": args.rollouts, "last_k": args.last_k, "n_test": args.n_test,
                "size": args.size, "quick": args.quick, "overrides": args.overrides,
                "command": "python benchmarks/recipe_sweep.py " + " ".join(sys.argv[1:])}
    previous = old.get("meta", {}).get("tasks")
    tasks = {t: v for t, v in (previous if isinstance(previous, dict) else {}).items()
             if t not in args.task_list}
    tasks |= {t: {"steps": args.steps_per_task[t], **settings} for t in args.task_list}
    cells_ = kept + results
    rows = summary_rows(cells_)
    meta = {"tasks": tasks, "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "summary": rows, "best": best_recipes(rows),
                                   "cells": cells_}, indent=1))
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(s, digits=3):
        return "-" if s is None else f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}"
    print(f"{'task':<18} {'recipe':<24} {'max':>15} {'last-k':>15} {'val action MSE':>19}")
    for r in rows:
        print(f"{r['task']:<18} {r['recipe']:<24} {fmt(r['score_max']):>15} "
              f"{fmt(r['score_last_k']):>15} {fmt(r['val_action_mse'], 4):>19}")


if __name__ == "__main__":
    sys.exit(main())
