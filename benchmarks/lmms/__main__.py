"""``python -m benchmarks.lmms --model prunebench_llava --model_args ... --tasks ...``: lmms-eval, honest exit code.

Takes exactly lmms-eval's own arguments (``--help`` lists them) and runs one evaluation through
lmms-eval's own ``cli_evaluate_single``. The difference from ``python -m lmms_eval``: lmms-eval's
``__main__`` ends with ``sys.exit(0)`` and its ``cli_evaluate`` catches every exception, so an import
error, an unreachable hub model, a failing pruner or a bad batch size still exits 0 and a sweep
script never notices. Here any failure prints the traceback, then one line ``prunebench: lmms-eval
evaluation failed: ...``, and exits 1; ``--config`` files with several runs are not supported (run
them one by one).
"""

from __future__ import annotations

import sys
import traceback

PROG = "python -m benchmarks.lmms"


def main(argv: list[str] | None = None) -> int:
    """Run lmms-eval with ``argv`` (default: the command line); 0 on success, 1 on any failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
        from lmms_eval.utils import make_table
    except Exception as e:  # lmms-eval missing or broken (e.g. a dependency it imports went away)
        traceback.print_exc()
        print(f"prunebench: cannot import lmms-eval ({type(e).__name__}: {e}); run `make setup`", file=sys.stderr)
        return 1
    saved, sys.argv = sys.argv, [PROG, *argv]
    try:
        _, args = parse_eval_args()  # argparse errors exit 2 with lmms-eval's own usage line
    finally:
        sys.argv = saved
    if not args.tasks:
        print(f"prunebench: --tasks is required (`{PROG} --tasks list` lists them)", file=sys.stderr)
        return 2
    if args.config:
        print(f"prunebench: {PROG} runs one evaluation; --config is not supported, pass the arguments "
              "directly", file=sys.stderr)
        return 2
    try:
        results, _ = cli_evaluate_single(args)
    except SystemExit as e:  # lmms-eval's own exits (`--tasks list`, no --tasks) keep their code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        traceback.print_exc()
        print(f"prunebench: lmms-eval evaluation failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if results is not None:  # None on ranks other than 0
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
