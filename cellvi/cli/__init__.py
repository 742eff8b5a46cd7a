"""The ``cellvi`` command line."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellvi",
        description="Single-cell variational inference.",
        epilog="Exit status: 0 done; 1 training failed (e.g. a NaN loss) or `validate` found "
        "a failed check; 2 unusable input (a one-line error); 130/143 interrupted by "
        "Ctrl-C/SIGTERM (`cellvi run WORKFLOW --resume` continues).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="end-to-end run on simulated data with ground truth")
    quick.add_argument("--out", default="cellvi_quickstart", help="output directory")
    quick.add_argument("--n-cells", type=int, default=6000)
    quick.add_argument("--n-genes", type=int, default=1000)
    quick.add_argument("--max-epochs", type=int, default=150)
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out")
    run = sub.add_parser("run", help="run a workflow described in a TOML file")
    run.add_argument("workflow", help="path of the workflow .toml")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run")
    run.add_argument(
        "--check",
        action="store_true",
        help="only check the workflow, its data, setup, model and requests; train nothing, "
        "write nothing",
    )
    val = sub.add_parser("validate", help="score and check a finished run's output folder")
    val.add_argument(
        "output_dir",
        help="the [outputs] dir of a finished `cellvi run` (exit 1 when a check fails)",
    )
    val.add_argument("--rerun", action="store_true", help="rerun with the same seed and compare")
    sim = sub.add_parser("simulate", help="write a simulated data set with its ground truth")
    sim.add_argument("output", help="path of the .h5ad to write")
    sim.add_argument("--n-cells", type=int, default=2000)
    sim.add_argument("--n-genes", type=int, default=500)
    sim.add_argument("--n-batches", type=int, default=2)
    sim.add_argument("--n-cell-types", type=int, default=3)
    sim.add_argument(
        "--n-de-genes-per-type",
        type=int,
        default=None,
        help="marker genes per cell type (default: 20, fewer when the genes do not fit)",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def _n_markers(n_genes: int, n_cell_types: int) -> int:
    """20 marker genes per type (``simulate``'s default), fewer when they would not fit."""
    return max(1, min(20, n_genes // max(n_cell_types, 1)))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellvi`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            from ._quickstart import run_quickstart

            run_quickstart(
                args.out,
                n_cells=args.n_cells,
                n_genes=args.n_genes,
                max_epochs=args.max_epochs,
                seed=args.seed,
                overwrite=args.overwrite,
            )
        elif args.command == "run":
            from ._run import run_workflow, secondary_rank

            with _stop_on_sigterm():
                out = run_workflow(args.workflow, resume=args.resume, check=args.check)
            if args.check:
                print(f"Checked {args.workflow}: ready to run (outputs would go to {out}).")
            elif not secondary_rank():  # a DDP process Lightning started: rank 0 reports
                print(f"Finished; outputs in {out}")
        elif args.command == "validate":
            import json

            from ._validate import validate_run

            report = validate_run(args.output_dir, rerun=args.rerun)
            print(json.dumps(report, indent=2))
            return 0 if report["healthy"] else 1
        elif args.command == "simulate":
            from pathlib import Path

            from ..simulate import simulate

            if Path(args.output).exists() and not args.overwrite:
                raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it.")
            n_markers = args.n_de_genes_per_type
            adata = simulate(
                n_cells=args.n_cells,
                n_genes=args.n_genes,
                n_batches=args.n_batches,
                n_cell_types=args.n_cell_types,
                n_de_genes_per_type=(
                    _n_markers(args.n_genes, args.n_cell_types) if n_markers is None else n_markers
                ),
                seed=args.seed,
            )
            adata.write_h5ad(args.output)
            print(f"Wrote {adata.n_obs} cells x {adata.n_vars} genes to {args.output}")
    except (KeyboardInterrupt, _Stopped) as err:  # outside training (e.g. during DE)
        signum = getattr(err, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        resume = (
            f" `cellvi run {args.workflow} --resume` finishes it." if args.command == "run" else ""
        )
        print(
            f"cellvi {args.command}: interrupted by {name}; the steps finished so far are "
            f"kept.{resume}",
            file=sys.stderr,
        )
        return 128 + int(signum)
    except Exception as err:
        code = _exit_code(err)
        if code is None:  # not a user error: the traceback is the useful report
            raise
        print(f"cellvi {args.command}: error: {_message(err, args)}", file=sys.stderr)
        return code
    return 0


class _Stopped(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """A termination signal that arrived outside training (training has its own guard)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM (a scheduler's stop) ends the command with a message, not silently; training
    installs its own handler meanwhile, which stops at a batch boundary."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_USER_ERRORS = (
    FileExistsError,
    FileNotFoundError,
    PermissionError,
    ValueError,
    KeyError,
    TypeError,
)


def _exit_code(err: BaseException) -> int | None:
    """2 for bad input, 1 for a training that failed (e.g. a NaN loss), 128 + the signal for
    an interrupted one (as a shell reports a killed command); ``None``: not ours to word."""
    from .. import errors

    if isinstance(err, errors.TrainingError):
        signum = getattr(err, "signum", None)  # TrainingInterrupted
        return 1 if signum is None else 128 + int(signum)
    if isinstance(err, (*_USER_ERRORS, errors.CellviError)):
        return 2
    return None


def _message(err: BaseException, args: argparse.Namespace) -> str:
    """The error with what was kept; the resume advice in command-line terms."""
    from .. import errors

    text = str(err)
    if isinstance(err, errors.InvalidDataError) and args.command == "run":
        # the advice is Python (e.g. adata.var_names_make_unique()): the data file is fixed
        # once, outside the workflow
        return (
            f"{text}\nIn a workflow, setup_anndata arguments go in [setup] (layer in [input]); "
            "a fix to the data itself is applied in Python to the file: write the result "
            "(adata.write_h5ad('fixed.h5ad')) and point [input].path at it."
        )
    if not isinstance(err, errors.TrainingError):
        return text
    notes = [n for n in getattr(err, "__notes__", []) if not n.startswith("To resume")]
    resumable = any(n.startswith("To resume") for n in getattr(err, "__notes__", []))
    lines = [text, *notes]
    if args.command == "run" and resumable:
        lines.append(
            f"To continue from the last finished epoch: cellvi run {args.workflow} --resume"
        )
    elif args.command == "run":
        lines.append(
            f"Nothing to resume; fix the cause and run `cellvi run {args.workflow}` again."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
