"""The ``pyro-bmr`` command (also ``python -m pyro_bmr.paper`` and ``python -m pyro_bmr``).

``pyro-bmr run`` compares the paper's methods on an image data set with
:func:`~pyro_bmr.paper.experiments.run_comparison`, prints the final numbers as a table
and writes ``results.json`` and the four figures with
:func:`~pyro_bmr.paper.experiments.write_outputs`. Bad options end in a one-line usage
error (exit code 2), a missing data set in a message that names the expected
files (exit code 1); neither prints a traceback.

Under ``torchrun`` (``torchrun --nproc-per-node N -m pyro_bmr run ...``) the command
trains data-parallel: it starts the process group from torchrun's environment
(:func:`~pyro_bmr.distributed.init_from_environment`: gloo on the CPU, NCCL on
``cuda:LOCAL_RANK``), each process trains on its shard of every global batch of
``--batch-size`` examples, and only rank 0 shows progress, prints and writes.
"""

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from pyro_bmr import distributed
from pyro_bmr.compiled_elbo import BACKENDS
from pyro_bmr.guides import GUIDES
from pyro_bmr.paper.methods import OPTIMIZERS

from .data import DATASETS, DEFAULT_DATA_DIR, DatasetNotFoundError, DatasetSplits, load_dataset
from .experiments import (
    DEFAULTS,
    OUTPUT_FILES,
    format_table,
    resolve_device,
    run_comparison,
    write_outputs,
)
from .methods import EXTRA_METHODS, METHODS
from .networks import NETWORKS
from .preset import PAPER_DATASETS, PAPER_NETWORKS, PRESETS, paper_preset

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Bayesian sparsification by Bayesian model reduction (Markovic, Friston & Kiebel, 2023):
train Bayesian networks with the paper's methods and compare them."""

_RUN_DESCRIPTION = f"""\
Train each method on a data set, evaluate it on the test split after every epoch, print a
table of the final test accuracy, NLL, ECE, pruned fraction and seconds per epoch, and write
{", ".join(OUTPUT_FILES)} to --out.

Methods: flat-map (Gaussian prior, MAP), flat-ff (Gaussian prior, fully factorised
posterior), tiered-ff (regularised horseshoe prior), bmr (stochastic Bayesian model
reduction with the spike-and-slab rule); beyond the paper's four, bmr-rhs (bmr's model
reduced by a regularised horseshoe fitted post hoc). With no options the comparison runs on
scikit-learn's 8x8 digits, which needs no download, in under a minute on two CPU cores.

Started by torchrun (torchrun --nproc-per-node N -m pyro_bmr run ...), it trains
data-parallel on N processes (CPU, gloo; or one GPU each, NCCL): --batch-size is the global
batch, divided among them, and only rank 0 prints and writes."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    data = run.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default=DEFAULTS["dataset"],
        help="data set (default: %(default)s; digits needs no files)",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help=f"directory holding the torchvision files, e.g. DIR/MNIST/raw "
        f"(default: ./{DEFAULT_DATA_DIR})",
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="download a missing torchvision data set into --data-dir (digits needs none)",
    )
    data.add_argument(
        "--train-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use only the first N training examples (default: all)",
    )
    data.add_argument(
        "--test-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use only the first N test examples (default: all)",
    )

    model = run.add_argument_group("model and methods")
    model.add_argument(
        "--preset",
        choices=PRESETS,
        default="quick",
        help="settings of everything not given explicitly: quick (tuned to train in "
        "minutes on a CPU) or paper (the authors' configuration for mlp, lenet, vit and "
        "mixer on mnist, fashion-mnist, cifar10 and cifar100) (default: %(default)s)",
    )
    model.add_argument(
        "--model",
        choices=tuple(NETWORKS),
        default=DEFAULTS["model"],
        help="network (default: %(default)s)",
    )
    model.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="WIDTH",
        help="hidden-layer widths of the mlp (default: 128; paper: 500 500 500 500)",
    )
    model.add_argument(
        "--methods",
        choices=METHODS + EXTRA_METHODS,
        nargs="+",
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to compare, in order; choose from {', '.join(METHODS + EXTRA_METHODS)} "
        f"(default: the paper's four, {' '.join(METHODS)})",
    )

    train = run.add_argument_group("training and evaluation")
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"training epochs per method (default: {DEFAULTS['epochs']}; paper: 50)",
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help=f"training batch size; under torchrun the global batch, divided among the "
        f"processes (default: {DEFAULTS['batch_size']}; paper: 120)",
    )
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help=f"learning rate of every method (default: {DEFAULTS['lr']}; paper: 1e-3 "
        "flat-map, 5e-3 flat-ff and tiered-ff, 1e-2 bmr)",
    )
    train.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help=f"posterior samples per test prediction (default: {DEFAULTS['samples']}; "
        "paper: 100; flat-map always 1)",
    )
    train.add_argument(
        "--eval-every",
        type=_positive_int,
        default=DEFAULTS["eval_every"],
        metavar="K",
        help="evaluate every K epochs and after the last (default: %(default)s)",
    )
    train.add_argument(
        "--guide",
        choices=GUIDES,
        default=None,
        help="mean-field guide of the Gaussian methods: Pyro's AutoNormal (auto), "
        "pyro_bmr's MeanFieldGuide (mean-field), or the latter with local "
        "reparameterisation (local) (default: auto)",
    )
    train.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="how each SVI step runs: captured once per model structure and compiled "
        "by torch.compile (inductor), captured and replayed uncompiled (fx), or Pyro's "
        "plain ELBO (eager) (default: inductor)",
    )
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help="torch's fused Adam (adam) or the authors' AdaBelief (adabelief) "
        "(default: adam; paper: adabelief)",
    )
    train.add_argument(
        "--warmup-steps",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="the steps of bmr and bmr-rhs before their first reduction (default: none; "
        "paper: 500)",
    )
    train.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        default=None,
        metavar="N",
        help="optimisation steps per epoch, cycling the training split (default: one "
        "pass; paper: 500)",
    )
    train.add_argument(
        "--rhs-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="bmr-rhs: SVI steps of each fit of the horseshoe's hyper-parameters "
        "(default: the authors' 5000)",
    )
    train.add_argument(
        "--rhs-particles",
        type=_positive_int,
        default=None,
        metavar="N",
        help="bmr-rhs: particles per SVI step of those fits (default: the authors' 16)",
    )
    train.add_argument(
        "--seed",
        type=_non_negative_int,
        default=DEFAULTS["seed"],
        help="random seed; the same seed gives the same results (default: %(default)s)",
    )
    train.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="CPU threads of torch's operations (default: %(default)s: these networks' "
        "tensors are small, and threads that wait on one another on a busy machine cost "
        "more than they gain)",
    )
    train.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where to train (default: cuda if available, else cpu)",
    )

    output = run.add_argument_group("output")
    output.add_argument(
        "--out",
        default="pyro-bmr-results",
        metavar="DIR",
        help="output directory, created if needed (default: %(default)s)",
    )
    output.add_argument("--no-progress", action="store_true", help="do not show progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-bmr`` and its ``run`` subcommand."""
    parser = argparse.ArgumentParser(prog="pyro-bmr", description=_DESCRIPTION)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="compare the sparsification methods on a data set",
        description=_RUN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(run)
    # Usage errors found after parsing are reported by the subcommand's parser.
    run.set_defaults(command_parser=run)
    return parser


def _check_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"argument --methods: a method is repeated in {' '.join(args.methods)}")
    if args.hidden is not None and args.model != "mlp":
        parser.error(f"argument --hidden: applies to --model mlp only, not {args.model}")
    if args.preset == "paper":
        if args.model not in PAPER_NETWORKS:
            parser.error(
                f"argument --preset: paper has no network {args.model!r}; "
                f"choose --model from {', '.join(PAPER_NETWORKS)}"
            )
        if args.dataset not in PAPER_DATASETS:
            parser.error(
                f"argument --preset: paper has no settings for {args.dataset!r}; "
                f"choose --dataset from {', '.join(PAPER_DATASETS)}"
            )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested, but CUDA is not available")
    processes = _world_size(parser)
    batch_size = args.batch_size
    if batch_size is None:
        preset = paper_preset(args.dataset, args.model) if args.preset == "paper" else None
        batch_size = preset.batch_size if preset else DEFAULTS["batch_size"]
    if batch_size % processes:
        given = "" if args.batch_size else f" (the {args.preset} preset's)"
        parser.error(
            f"argument --batch-size: the global batch of {batch_size}{given} does not divide "
            f"among the {processes} processes torchrun started; give a multiple of {processes}"
        )


def _world_size(parser: argparse.ArgumentParser) -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without it)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        parser.error(f"environment variable WORLD_SIZE must be a positive integer, got {text!r}")
    return size


def _reduction(args: argparse.Namespace) -> dict[str, int] | None:
    """The options of bmr-rhs's reduction given on the command line, if any."""
    given = {"num_steps": args.rhs_steps, "num_particles": args.rhs_particles}
    given = {name: value for name, value in given.items() if value is not None}
    return given or None


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    parallel = _world_size(args.command_parser) > 1
    if parallel:
        device = distributed.init_from_environment(device)
    try:
        return _compare(args, device)
    finally:
        if parallel:
            torch.distributed.destroy_process_group()


def _compare(args: argparse.Namespace, device: torch.device) -> int:
    rank = distributed.world()[0]
    try:
        data = _load(args, device, rank)
    except (DatasetNotFoundError, ValueError) as error:
        # Missing or malformed files, or more examples asked for than there are.
        if rank == 0:
            print(f"pyro-bmr: error: {error}", file=sys.stderr)
        return 1
    results, weights = run_comparison(
        data,
        args.model,
        args.methods,
        preset=args.preset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        samples=args.samples,
        seed=args.seed,
        device=device,
        data_dir=args.data_dir,
        hidden=args.hidden,
        eval_every=args.eval_every,
        progress=not args.no_progress,
        guide=args.guide,
        optimizer=args.optimizer,
        backend=args.backend,
        steps_per_epoch=args.steps_per_epoch,
        warmup_steps=args.warmup_steps,
        reduction=_reduction(args),
    )
    if rank != 0:  # every rank holds the same results: one writes them
        return 0
    config = results["config"]
    processes = f", {config['processes']} processes" if config["processes"] > 1 else ""
    print(
        f"\n{config['dataset']} ({config['train_size']} train, {config['test_size']} test), "
        f"{config['model']}, {config['epochs']} epochs, seed {config['seed']}, "
        f"{config['device']}{processes}; test set after the last epoch:\n"
    )
    print(format_table(results))
    paths = write_outputs(results, weights, args.out)
    print(f"\nwrote {', '.join(paths)} to {args.out}")
    return 0


def _load(args: argparse.Namespace, device: torch.device, rank: int) -> DatasetSplits:
    """The data set; under torchrun, rank 0 downloads it before the others read it."""
    waits = args.download and distributed.is_distributed()
    if waits and rank != 0:
        torch.distributed.barrier()
    try:
        return load_dataset(
            args.dataset,
            args.data_dir,
            args.download,
            train_size=args.train_size,
            test_size=args.test_size,
            device=device,
        )
    finally:
        if waits and rank == 0:
            torch.distributed.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``pyro-bmr`` with ``argv`` (default ``sys.argv[1:]``).

    :returns: the exit code: 0 on success, 1 if the data cannot be loaded, 2 for
        invalid options (after argparse has printed the usage error); ``--help``
        prints the help and returns 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_run(args.command_parser, args)
    except SystemExit as exit_:
        # argparse exits after --help (0) and after printing a usage error (2).
        return exit_.code if isinstance(exit_.code, int) else 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)
