"""The benchmark table: drifting (1 NFE) vs Diffusion Policy on every task, same network, same
budget, Diffusion Policy's scoring protocol over training seeds. One command:

    python benchmarks/table.py                                  # every task, default budgets
    python benchmarks/table.py --tasks pusht_lowdim,lift_lowdim --minutes 20 --seeds 2
    python benchmarks/table.py --minutes pusht_lowdim=30,can_lowdim=40 --seeds 2
    python benchmarks/table.py --markdown-only                  # regenerate the README table

Per task: the expert demos are generated once (cached at the task's dataset path); each policy
and seed trains for the same wall-clock budget of optimisation (--minutes; the cosine lr
schedule spans the steps a 20-step probe predicts, the budget caps it), rolling the EMA policy
out every `--rollouts` evenly spaced times on held-out test seeds. Diffusion Policy's simulation
protocol scores with DDPM-100, but on this CPU its evaluation alone exceeds every task's budget
(measured, one thread: one 50-episode PushT evaluation 848 s, Lift 393 s; ten of them are
2.4 h / 65 min against 30 / 15 min of training). So by default (--periodic-sampler ddim10)
DDIM-10 scores diffusion's periodic rollouts and DDPM-100 scores its final weights, in its own
row (k = 1); --periodic-sampler ddpm100 where evaluation is cheap. A run's score is the max and
the mean of its last k rollouts (--last-k 3 of --rollouts 10: the final 30% of training, where
Diffusion Policy averages its last 10 of dozens of checkpoints); rows give mean +- std over seeds.

Equal wall-clock is the headline. Equal steps is reported beside it from the same runs: each
policy's rollouts up to the step count the slower-stepping policy reached (the lr schedules are
those of the equal-time runs; stated in the JSON). Each row also gives steps, samples seen, NFE,
batch-1 latency, the total minutes of training plus periodic rollouts, and the time to reach
score S (evaluation included).

Runs are resumable across sessions: a finished run (work/TASK/POLICY_seedS/run.json) is read
back, an interrupted one continues from its last checkpoint with its original step plan,
and a final DDPM-100 evaluation (work/TASK/diffusion_seedS/eval_final_ddpm100/) is read back
too, so regenerating a task's rows after its runs costs seconds.
`--jobs 2` trains drifting and diffusion of a seed side by side, one thread each.

Writes benchmarks/results/table_cpu.json and .md beside it, and replaces the README's table
between the `<!-- table_cpu:begin -->` / `<!-- table_cpu:end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from compare import summarise

from drifting_policy.bench import time_ms
from drifting_policy.checkpoint import load_policy
from drifting_policy.config import compose
from drifting_policy.data import demos
from drifting_policy.eval import evaluate
from drifting_policy.persist import atomic_path
from drifting_policy.plots import read_logs
from drifting_policy.train import TrainWorkspace

RESULTS = Path("benchmarks/results")
README_BEGIN, README_END = "<!-- table_cpu:begin -->", "<!-- table_cpu:end -->"


@dataclass(frozen=True)
class TaskSpec:
    """How a task enters the table: its demos, its headline metric, its CPU budget."""

    demos: tuple[str, ...]      # `drifting-policy demos` arguments (without --out)
    metric: str                 # the runner's metric the table scores
    minutes: float              # default training budget per policy and seed
    target: float = 0.5         # S of the "time to reach S" column (the targets)


TASKS: dict[str, TaskSpec] = {
    "pusht_lowdim": TaskSpec(("pusht", "--episodes", "200"), "mean_score", 30, target=0.80),
    "lift_lowdim": TaskSpec(("lift", "--episodes", "100"), "mean_score", 15, target=0.98),
    "can_lowdim": TaskSpec(("can", "--episodes", "100"), "mean_score", 30, target=0.80),
    "tool_hang_lowdim": TaskSpec(("tool_hang", "--episodes", "100"), "mean_score", 45,
                                 target=0.20),
    "blockpush_lowdim": TaskSpec(("blockpush", "--episodes", "200"), "p1", 30, target=0.40),
    "kitchen_lowdim": TaskSpec(("kitchen", "--episodes", "200"), "p4", 30, target=0.50),
    "pusht_image": TaskSpec(("pusht", "--episodes", "200"), "mean_score", 45, target=0.60),
    "lift_image": TaskSpec(("lift", "--episodes", "50", "--image"), "mean_score", 45,
                           target=0.90),
    "can_image": TaskSpec(("can", "--episodes", "100", "--image"), "mean_score", 60,
                          target=0.50),
}
SAMPLERS = {"ddpm100": ("ddpm", 100), "ddim10": ("ddim", 10)}


def _per_task(text: str | None, cast, tasks: list[str]) -> dict:
    """'5' -> {task: 5 for all}; 'a=5,b=7' -> {a: 5, b: 7} (others: None)."""
    if text is None:
        return {}
    if "=" not in text:
        return dict.fromkeys(tasks, cast(text))
    pairs = dict(item.split("=", 1) for item in text.split(","))
    unknown = sorted(set(pairs) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}; expected some of {sorted(TASKS)}")
    return {k: cast(v) for k, v in pairs.items()}


def ensure_demos(task: str, spec: TaskSpec, overrides: list[str]) -> Path:
    """The task's dataset, generated by its scripted expert the first time."""
    path = Path(compose("train_policy", [f"task={task}", *overrides]).task.dataset.path)
    if not path.exists():
        print(f"[{task}] generating demos -> {path}", flush=True)
        if demos.main([*spec.demos, "--out", str(path)]):
            raise SystemExit(f"error: demos for {task} failed")
    return path


def _config(task: str, policy: str, seed: int, run_dir: Path, args, extra: list[str]):
    return compose("train_policy", [
        f"task={task}", f"policy={policy}", f"size={args.size}", f"seed={seed}",
        f"run_dir={run_dir}", f"training.rollout.n_test={args.n_test}",
        f"task.runner.n_envs={args.n_envs}", "training.rollout.n_videos=0",
        "training.final_rollout=true", "training.val_every=1000", "logging.mode=disabled",
        *args.overrides, *extra,
    ])


def seconds_per_step(task: str, policy: str, args, extra: list[str]) -> float:
    """A 20-step probe (after 5 warm-up steps) of this machine's training step."""
    probe = args.work / "probe" / f"{task}_{policy}"
    ws = TrainWorkspace(_config(task, policy, 0, probe, args, [
        "training.num_steps=25", "training.rollout_every=0", "training.checkpoint_every=0",
        "training.val_every=0", *extra]))
    ws.run(until_step=5)
    t0 = ws.train_seconds
    ws.run(until_step=25)
    return (ws.train_seconds - t0) / 20


def measured_seconds_per_step(run_dir: Path) -> float | None:
    """The step time a finished run of the same task and policy (another seed) measured over
    its whole budget, or None. Later seeds plan with it: a 20-step probe varies by +-20% with
    what the other job is doing at that moment."""
    for other in sorted(run_dir.parent.glob(run_dir.name.rsplit("_seed", 1)[0] + "_seed*")):
        if other != run_dir and (other / "run.json").is_file():
            done = json.loads((other / "run.json").read_text())
            if done["steps"]:
                return done["train_seconds"] / done["steps"]
    return None


def train(task: str, spec: TaskSpec, policy: str, seed: int, minutes: float, args) -> dict:
    """One equal-time run with periodic rollouts; returns its curve and final workspace facts.

    Resumable: the run's plan (its step count from the probe) is kept in run_dir/plan.json and
    its result in run_dir/run.json; a finished run is read back, an interrupted one continues
    from its last checkpoint with the same plan (its train and rollout seconds carry over)."""
    run_dir = args.work / task / f"{policy}_seed{seed}"
    if (run_dir / "run.json").is_file():
        return _read_run(run_dir)
    extra = []
    if policy == "diffusion":
        scheduler, nfe = SAMPLERS[args.periodic_sampler]
        extra = [f"policy.scheduler={scheduler}", f"policy.num_inference_steps={nfe}"]
    plan_path = run_dir / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        if policy == "diffusion" and plan.get("periodic_sampler") != args.periodic_sampler:
            raise SystemExit(f"error: {run_dir} was started with --periodic-sampler "
                             f"{plan.get('periodic_sampler')}, not {args.periodic_sampler}")
    else:
        step_s = measured_seconds_per_step(run_dir) or seconds_per_step(task, policy, args, extra)
        plan = {"seconds_per_step": step_s, "minutes": minutes,
                "planned_steps": max(int(60 * minutes / step_s), args.rollouts),
                "threads": torch.get_num_threads(), "periodic_sampler": args.periodic_sampler}
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(plan_path) as tmp:
            tmp.write_text(json.dumps(plan))
    every = max(plan["planned_steps"] // args.rollouts, 1)
    steps = every * args.rollouts  # the last periodic rollout is the final one (no near-repeat)
    resume = (run_dir / "checkpoints" / "latest").is_dir()
    ws = TrainWorkspace(_config(task, policy, seed, run_dir, args, [
        f"training.num_steps={steps}", f"training.max_minutes={plan['minutes']}",
        f"training.rollout_every={every}", f"training.checkpoint_every={every}",
        f"resume={str(resume).lower()}", *extra]))
    ws.run()
    run = {**plan, "steps": ws.step, "train_seconds": ws.train_seconds,
           "rollout_seconds": ws.rollout_seconds, "batch_size": ws.cfg.training.batch_size,
           "gen_per_obs": ws.cfg.policy.get("gen_per_obs", 1), "metric": spec.metric}
    with atomic_path(run_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(run, indent=1))
    return _read_run(run_dir)


def _read_run(run_dir: Path) -> dict:
    """A finished run: run.json plus its rollout curve (from logs.jsonl; a step logged again
    after a resume keeps its last record)."""
    run = json.loads((run_dir / "run.json").read_text())
    key = f"test/{run['metric']}"
    by_step = {r["step"]: {"step": r["step"], "train_seconds": r["train_seconds"],
                           "rollout_seconds": r.get("rollout_seconds", 0.0), "score": r[key]}
               for r in read_logs(run_dir / "logs.jsonl") if key in r}
    curve = [by_step[step] for step in sorted(by_step)]
    return {**run, "run_dir": run_dir, "curve": curve}


def train_all(task: str, spec: TaskSpec, minutes: float, args) -> dict[str, list[dict]]:
    """Every policy x seed run of a task. --jobs N runs N at once (drifting and diffusion of a
    seed side by side), each in its own process with cores / N threads."""
    todo = [(policy, 42 + i) for i in range(args.seeds) for policy in ("drifting", "diffusion")]
    if args.jobs == 1:
        done = {job: train(task, spec, *job, minutes, args) for job in todo}
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}

        def launch(job):
            policy, seed = job
            log = args.work / task / f"{policy}_seed{seed}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                code = subprocess.run([sys.executable, __file__, "--one-run", f"{policy}:{seed}",
                                       *_child_argv(task, minutes, args)],
                                      stdout=f, stderr=subprocess.STDOUT, env=env).returncode
            if code:
                raise RuntimeError(f"{task} {policy} seed {seed} failed (exit {code}); see {log}")
            return _read_run(args.work / task / f"{policy}_seed{seed}")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = dict(zip(todo, pool.map(launch, todo)))
    return {p: [done[(p, 42 + i)] for i in range(args.seeds)] for p in ("drifting", "diffusion")}


def _child_argv(task: str, minutes: float, args) -> list[str]:
    """This script's arguments for one run of `task` in a child process."""
    return ["--tasks", task, "--minutes", str(minutes), "--rollouts", str(args.rollouts),
            "--n-test", str(args.n_test), "--n-envs", str(args.n_envs), "--size", args.size,
            "--periodic-sampler", args.periodic_sampler,
            "--work", str(args.work), *args.overrides]


def protocol(curve: list[dict], up_to_step: int | None = None, k: int = 10) -> dict | None:
    """DP's scores over a run's rollouts (optionally only those at steps <= up_to_step)."""
    scores = [c["score"] for c in curve if up_to_step is None or c["step"] <= up_to_step]
    if not scores:
        return None
    last = scores[-k:]
    return {"max": max(scores), "last_k": statistics.fmean(last), "k": len(last)}


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Minutes of training plus evaluation until the first rollout scoring >= target."""
    for c in curve:
        if c["score"] >= target:
            return (c["train_seconds"] + c["rollout_seconds"]) / 60
    return None


def final_policy(run: dict, sampler: str | None):
    """The run's final EMA policy, with diffusion's `sampler` ("ddpm100" | "ddim10")."""
    policy, _ = load_policy(run["run_dir"] / "checkpoints" / "latest")
    if sampler:
        policy.set_inference(*SAMPLERS[sampler])
    return policy


def final_score(run: dict, policy, sampler: str, metric: str, args) -> tuple[float, float]:
    """The final weights on the test seeds with `sampler` (one the periodic rollouts did not
    use): (score, seconds of that evaluation). Kept in run_dir/eval_final_SAMPLER/eval.json and
    read back when it scored the same number of test seeds."""
    out = run["run_dir"] / f"eval_final_{sampler}"
    kept = out / "eval.json"
    result = json.loads(kept.read_text()) if kept.is_file() else None
    if result is None or result["n_test"] != args.n_test:
        result = evaluate(run["run_dir"] / "checkpoints" / "latest", out, n_test=args.n_test,
                          n_envs=args.n_envs, n_videos=0, policy=policy, progress=False)
    return result[metric], result["eval_seconds"]


def latency_ms(policy) -> float:
    """Median batch-1 predict_action latency (random observations of the right shapes)."""
    shape_meta = policy.config.shape_meta["obs"]
    obs = {k: torch.rand(1, policy.n_obs_steps, *m["shape"]) for k, m in shape_meta.items()}
    with torch.inference_mode():
        return statistics.median(time_ms(partial(policy.predict_action, obs), 20, 3))


def task_rows(task: str, spec: TaskSpec, minutes: float, args) -> list[dict]:
    ensure_demos(task, spec, args.overrides)
    runs = train_all(task, spec, minutes, args)
    equal_steps = min(r["steps"] for rs in runs.values() for r in rs)
    rows = []
    variants = [("drifting", "drifting", None), ("diffusion", args.periodic_sampler, None)]
    if args.periodic_sampler != "ddpm100":  # DDPM-100 scores the final weights only
        variants.append(("diffusion", "ddpm100", "ddpm100"))
    for policy, name, final_sampler in variants:
        per_seed = []
        for run in runs[policy]:
            policy_ = final_policy(run, None if policy == "drifting" else name)
            eval_seconds = run["rollout_seconds"]
            if final_sampler:  # scored once, on the final weights: no curve, so no score at
                # equal steps (unless the run stopped there) and no time to reach S
                score, seconds = final_score(run, policy_, final_sampler, spec.metric, args)
                eval_seconds += seconds
                at_time = {"max": score, "last_k": score, "k": 1}
                at_steps = at_time if run["steps"] <= equal_steps else None
                reach = None
            else:
                at_time = protocol(run["curve"], k=args.last_k)
                at_steps = protocol(run["curve"], equal_steps, k=args.last_k)
                reach = time_to_reach(run["curve"], spec.target)
            per_seed.append({
                "seed": run["run_dir"].name, "latency_ms": latency_ms(policy_),
                "equal_time": at_time, "equal_steps": at_steps, "steps": run["steps"],
                "train_minutes": run["train_seconds"] / 60,
                "total_minutes": (run["train_seconds"] + eval_seconds) / 60,
                "samples_seen": run["steps"] * run["batch_size"],
                "time_to_target_minutes": reach,
                "curve": [] if final_sampler else [  # (minutes incl. evaluation, score)
                    [(c["train_seconds"] + c["rollout_seconds"]) / 60, c["score"]]
                    for c in run["curve"]],
            })
        for budget in ("equal_time", "equal_steps"):
            # a seed with no rollout within the budget (None) is left out of the statistics
            scored = [s[budget] for s in per_seed if s[budget] is not None]
            stats = summarise([{"policy": name, "score_max": s["max"], "score_last_k": s["last_k"]}
                               for s in scored], ["score_max", "score_last_k"]).get(name, {})
            reach = [s["time_to_target_minutes"] for s in per_seed]
            rows.append({
                "task": task, "policy": name, "budget": budget,
                "seeds": [42 + i for i in range(args.seeds)],
                "score_max": stats.get("score_max"), "score_last_k": stats.get("score_last_k"),
                "k": min((s["k"] for s in scored), default=0), "metric": spec.metric,
                "train_minutes": statistics.fmean(s["train_minutes"] for s in per_seed),
                "train_steps": (equal_steps if budget == "equal_steps" else
                                round(statistics.fmean(s["steps"] for s in per_seed))),
                "samples_seen": round(statistics.fmean(s["samples_seen"] for s in per_seed)),
                "nfe": 1 if policy == "drifting" else SAMPLERS[name][1],
                "latency_ms": statistics.fmean(s["latency_ms"] for s in per_seed),
                "total_minutes_with_eval": statistics.fmean(s["total_minutes"] for s in per_seed),
                "target": spec.target,
                "time_to_target_minutes": (None if None in reach else statistics.fmean(reach)),
                "per_seed": per_seed,
            })
    return rows


def verdict(rows: list[dict], task: str, budget: str) -> str:
    """Drifting vs DDPM-100 on mean-of-last-k: within the seed spread, above or below."""
    def pick(name):
        return next((r for r in rows if (r["task"], r["policy"], r["budget"]) ==
                     (task, name, budget)), None)
    drift, ddpm = pick("drifting"), pick("ddpm100")
    if None in (drift, ddpm) or None in (drift["score_last_k"], ddpm["score_last_k"]):
        return "-"
    a, b = drift["score_last_k"], ddpm["score_last_k"]
    spread = a["std"] + b["std"]
    if abs(a["mean"] - b["mean"]) <= spread:
        return "within spread"
    return "above" if a["mean"] > b["mean"] else "below"


def markdown(table: dict) -> str:
    """The README table: one line per task x policy at equal time, equal steps beside it."""
    rows = table["rows"]
    head = ("| task | policy | metric | equal time: max / last-k | equal steps: max / last-k | "
            "steps | NFE | latency ms | total min (eval incl.) | min to S | drifting vs DDPM-100 "
            "(time / steps) |\n|" + "---|" * 11)
    lines = [head]

    def fmt(s):
        return "-" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}"
    for r in (r for r in rows if r["budget"] == "equal_time"):
        steps = next(x for x in rows if (x["task"], x["policy"], x["budget"]) ==
                     (r["task"], r["policy"], "equal_steps"))
        reach = r["time_to_target_minutes"]
        lines.append(
            f"| {r['task']} | {r['policy']} | {r['metric']} | {fmt(r['score_max'])} / "
            f"{fmt(r['score_last_k'])} | {fmt(steps['score_max'])} / "
            f"{fmt(steps['score_last_k'])} ({steps['train_steps']}) | {r['train_steps']} | "
            f"{r['nfe']} | {r['latency_ms']:.1f} | {r['total_minutes_with_eval']:.1f} | "
            f"{'-' if reach is None else f'{reach:.1f}'} (S={r['target']:g}) | "
            + (f"{verdict(rows, r['task'], 'equal_time')} / "
               f"{verdict(rows, r['task'], 'equal_steps')} |" if r["policy"] == "drifting"
               else "|"))
    meta = table["meta"]
    lines.append(f"\nHeld-out test seeds 100000 + i; {meta['machine']} CPU. Per task:\n")
    for task, m in meta["tasks"].items():
        seeds = f"{m['seeds']} training seed{'s' * (m['seeds'] != 1)}"
        lines.append(f"- {task}: {seeds} x {m['minutes']:g} min of training, "
                     f"{m['rollouts_per_run']} rollouts of {m['n_test']} test seeds "
                     f"({m['n_envs']} envs at once), last {m['last_k']}; `{m['command']}`")
    return "\n".join(lines) + "\n"


def write_markdown(table: dict, md: Path, readme: Path) -> None:
    """The table as markdown at `md`, and inside `readme` between the table markers."""
    text = markdown(table)
    md.write_text(text)
    if readme.is_file() and README_BEGIN in readme.read_text():
        before, rest = readme.read_text().split(README_BEGIN, 1)
        after = rest.split(README_END, 1)[1]
        readme.write_text(f"{before}{README_BEGIN}\n{text}{README_END}{after}")


def plot_curves(table: dict, path: Path) -> None:
    """Score vs minutes of training plus periodic evaluation, one panel per task with curves,
    one line per policy and seed (the equal-time runs); a policy scored on its final weights
    only (DDPM-100 on a CPU) is one marker per seed at its minutes including that evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["budget"] == "equal_time"]
    tasks = list(dict.fromkeys(r["task"] for r in rows
                               if any(s.get("curve") for s in r["per_seed"])))
    if not tasks:
        return
    cols = min(3, len(tasks))
    fig, axes = plt.subplots((len(tasks) + cols - 1) // cols, cols, squeeze=False,
                             figsize=(4.2 * cols, 3.2 * ((len(tasks) + cols - 1) // cols)))
    for ax, task in zip(axes.flat, tasks):
        for i, r in enumerate(r for r in rows if r["task"] == task):
            label = f"{r['policy']} ({r['nfe']} NFE)"
            for j, s in enumerate(r["per_seed"]):
                if s.get("curve"):
                    x, y = zip(*s["curve"])
                    ax.plot(x, y, color=f"C{i}", marker=".", lw=1, alpha=0.9 - 0.3 * j,
                            label=label if j == 0 else None)
                elif s.get("equal_time"):  # final weights only
                    ax.plot(s["total_minutes"], s["equal_time"]["max"], color=f"C{i}",
                            marker="*", ms=9, ls="", label=f"{label}, final" if j == 0 else None)
        ax.axhline(next(r["target"] for r in rows if r["task"] == task), color="grey", ls=":",
                   lw=0.8)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("minutes (training + periodic evaluation)", fontsize=8)
        ax.set_ylabel(next(r["metric"] for r in rows if r["task"] == task), fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle("score vs wall-clock on this CPU\n(one line per training seed; dotted: target S)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def merge(table: dict, task: str, rows: list[dict], task_meta: dict) -> dict:
    """`table` with `task`'s rows and meta entry replaced by `rows` and `task_meta` (the other
    tasks' kept); rows and meta entries in TASKS order, whichever task ran first."""
    order = list(TASKS).index
    tasks = {**table.get("meta", {}).get("tasks", {}), task: task_meta}
    return {
        "rows": sorted([r for r in table["rows"] if r["task"] != task] + rows,
                       key=lambda r: order(r["task"])),
        "meta": {
            "torch": torch.__version__, "machine": platform.machine(),
            "equal_steps": "each policy's rollouts up to the fewer steps of the two, from the "
                           "equal-time runs",
            "tasks": {t: tasks[t] for t in sorted(tasks, key=order)}},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    p.add_argument("--minutes", default=None, help="M (all tasks) or task=M,task=M")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--rollouts", type=int, default=10, help="periodic rollouts per run")
    p.add_argument("--last-k", type=int, default=3,
                   help="DP's mean of the last k rollouts (DP: the last 10 of dozens of "
                        "checkpoints; here 3 of 10: the final 30%% of training)")
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--n-envs", type=int, default=2,
                   help="env processes per rollout, stepped as one policy batch (a policy call "
                        "costs about the same at batch 2 and 8 here: more envs cut evaluation "
                        "where sampling dominates, e.g. DDPM-100, BlockPush's Ta = 1)")
    p.add_argument("--size", default="cpu")
    p.add_argument("--periodic-sampler", choices=sorted(SAMPLERS), default="ddim10",
                   help="diffusion's sampler for the periodic rollouts (ddim10: DDPM-100 then "
                        "scores the final weights, its own row; ddpm100 where evaluation is "
                        "cheap, e.g. on a GPU)")
    p.add_argument("--work", type=Path, default=Path("outputs/table"))
    p.add_argument("--out", type=Path, default=RESULTS / "table_cpu.json")
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with cores / N threads (2 on a 2-core machine: "
                        "drifting and diffusion side by side, ~1.4x the throughput)")
    p.add_argument("--markdown-only", action="store_true", help="regenerate tables from --out")
    p.add_argument("--one-run", metavar="POLICY:SEED", help=argparse.SUPPRESS)  # --jobs' children
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for every run")
    args = p.parse_args()
    curves = args.out.with_name(args.out.stem + "_curves.png")
    if args.markdown_only:
        table = json.loads(args.out.read_text())
        write_markdown(table, args.out.with_suffix(".md"), args.readme)
        plot_curves(table, curves)
        return 0
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        p.error(f"--tasks: unknown {unknown}; expected some of {sorted(TASKS)}")
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, got {args.jobs}")
    minutes = {t: TASKS[t].minutes for t in tasks} | _per_task(args.minutes, float, tasks)
    if args.one_run:
        policy, seed = args.one_run.split(":")
        train(tasks[0], TASKS[tasks[0]], policy, int(seed), minutes[tasks[0]], args)
        return 0
    table = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    for task in tasks:
        rows = task_rows(task, TASKS[task], minutes[task], args)
        table = merge(table, task, rows, {
            "seeds": args.seeds, "n_test": args.n_test, "size": args.size,
            "minutes": minutes[task], "periodic_sampler": args.periodic_sampler,
            "rollouts_per_run": args.rollouts, "last_k": args.last_k, "jobs": args.jobs,
            "n_envs": args.n_envs,
            "command": "python benchmarks/table.py " + " ".join(sys.argv[1:])})
        with atomic_path(args.out) as tmp:  # a crash mid-write keeps the earlier tasks' rows
            tmp.write_text(json.dumps(table, indent=1, default=str))
        this_task = {**table["meta"], "tasks": {task: table["meta"]["tasks"][task]}}
        print(markdown({"rows": rows, "meta": this_task}), flush=True)
    write_markdown(table, args.out.with_suffix(".md"), args.readme)
    plot_curves(table, curves)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
