"""`drifting-policy` console script: one entry point, one subcommand per job.

    drifting-policy demo                       PushT end to end on a CPU (make demo)
    drifting-policy toy   ...                  2-D drifting demo
    drifting-policy demos pusht --episodes N --out PATH.zarr   [--format lerobot]
    drifting-policy convert SRC DST             zarr / robomimic HDF5 <-> LeRobot v3
    drifting-policy train task=pusht_lowdim policy=drifting [overrides]  (--help: configs)
    drifting-policy eval  --checkpoint DIR --n-test 50 --out DIR
    drifting-policy bench latency --quick --out FILE.json
    drifting-policy bench control --quick --out FILE.json
    drifting-policy run   --checkpoint DIR --rate 10 --episodes 1 --out DIR   (real-time loop)
    drifting-policy serve --checkpoint DIR --bind tcp://127.0.0.1:5555        (ZeroMQ server)
    drifting-policy export --checkpoint DIR --format onnx --out FILE.onnx
    drifting-policy convert-abs IN.hdf5 OUT.hdf5   robomimic delta -> absolute actions

Add --debug to any command for the full traceback of an error.
"""

from __future__ import annotations

import argparse
import os
import sys

DEBUG_ENV = "DRIFTING_POLICY_DEBUG"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (bad value, missing file, unknown task or
    key): one line on stderr, no traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, HydraException,
            OmegaConfBaseException)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a user mistake prints `drifting-policy: error: ...` and exits 2
    (`--debug` or DRIFTING_POLICY_DEBUG=1 shows the traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _dispatch(argv)
    except _user_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"drifting-policy: error: {message} (--debug shows the traceback)",
              file=sys.stderr)
        return 2


def _dispatch(argv: list[str]) -> int:
    # train takes hydra overrides (key=value), not argparse flags
    if argv[:1] == ["train"]:
        from drifting_policy import train

        return train.main(argv[1:])
    if argv[:1] == ["demos"]:
        from drifting_policy.data import demos

        return demos.main(argv[1:])

    parser = argparse.ArgumentParser(
        prog="drifting-policy", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a policy (hydra overrides: task=... policy=... key=value)")
    sub.add_parser("demos", help="write expert demonstrations (see `demos --help`)")

    from drifting_policy import demo, toy
    from drifting_policy import eval as evaluation
    from drifting_policy.bench import add_arguments as bench_arguments
    from drifting_policy.deploy import export, run, server

    toy.add_arguments(sub.add_parser("toy", help="2-D drifting demo (mode recovery, figure)"))
    evaluation.add_arguments(sub.add_parser("eval", help="evaluate a checkpoint in simulation"))
    demo.add_arguments(sub.add_parser("demo", help="the main job: PushT demos -> train -> eval"))
    bench_arguments(sub.add_parser("bench", help="benchmarks (latency, control, export)"))
    run.add_arguments(sub.add_parser("run", help="drive the task's env in real time"))
    server.add_arguments(sub.add_parser("serve", help="serve a policy over ZeroMQ"))
    export.add_arguments(sub.add_parser("export", help="export a drifting policy to ONNX"))
    from drifting_policy.data import convert, convert_abs

    convert.add_arguments(sub.add_parser(
        "convert", help="zarr / robomimic HDF5 <-> LeRobotDataset v3 (see `convert --help`)"))

    convert_abs.add_arguments(sub.add_parser(
        "convert-abs", help="robomimic HDF5: delta actions -> absolute (position, axis-angle, "
                            "gripper), env_args set to absolute control"))

    args = parser.parse_args(argv)
    from drifting_policy.bench import main as bench_main

    handlers = {"toy": toy.main, "demo": demo.main, "eval": evaluation.main,
                "run": run.main, "serve": server.main, "export": export.main,
                "bench": bench_main, "convert-abs": convert_abs.main, "convert": convert.main}
    if args.command in handlers:
        return handlers[args.command](args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
