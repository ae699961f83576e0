"""The ``autopose`` command.

One parser, one small handler per verb. Handlers import their layer lazily so
that ``autopose --help`` is instant and the data commands run without Ray.
Every handler turns :class:`~autopose.errors.AutoposeError` into one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autopose.errors import AutoposeError


# -- data --------------------------------------------------------------------------
def _data_synth(args: argparse.Namespace) -> int:
    from autopose.data.synth import generate_synth

    try:
        height, width = (int(part) for part in args.size.lower().split("x"))
    except ValueError:
        raise AutoposeError(f"expected HxW such as 240x320, got {args.size!r}", field="--size") from None
    report = generate_synth(
        args.out,
        images=args.images,
        val_images=args.val_images,
        seed=args.seed,
        shift=args.shift,
        image_size=(height, width),
        max_persons=args.max_persons,
        holdout_images=args.holdout_images,
        clutter=not args.plain,
    )
    print(report.summary())
    return 0


def _data_build_proxy(args: argparse.Namespace) -> int:
    from autopose.data.proxy import build_proxy
    from autopose.data.transforms import parse_size

    try:
        input_size = parse_size(args.input)
    except ValueError as error:
        raise AutoposeError(str(error), field="--input") from None
    report = build_proxy(
        args.ann,
        args.images,
        args.out,
        max_images=args.max_images,
        seed=args.seed,
        input_size=input_size,
        exclude=args.exclude,
        margin=args.margin,
    )
    print(report.summary())
    return 0


# -- models and inference -------------------------------------------------------------
def _model_info(args: argparse.Namespace) -> int:
    from autopose.data.transforms import parse_size
    from autopose.models.complexity import model_info
    from autopose.models.p2net import PAPER_R101_384x288

    try:
        input_size = parse_size(args.input)
    except ValueError as error:
        raise AutoposeError(str(error), field="--input") from None
    info = model_info(args.arch, input_size=input_size, num_joints=args.joints)
    height, width = input_size
    print(f"arch         {info['arch']}  (input {height}x{width}, {info['num_joints']} joints)")
    print(f"parameters   {info['params']:,}  ({info['params'] / 1e6:.2f} M)")
    print(f"multiply-add {info['macs']:,}")
    print(f"GFLOPs       {info['gflops_hrnet']:.2f}  (MACs / 2^30, as HRNet's reference code)")
    print(f"GFLOPs       {info['gflops_1e9']:.2f}  (MACs / 1e9)")
    if info["arch"] == "p2net_r101":
        paper_params, paper_gflops = PAPER_R101_384x288["params"], PAPER_R101_384x288["gflops"]
        print(f"paper        P2Net-R101, 384x288: {paper_params / 1e6:.1f} M params, {paper_gflops} GFLOPs")
        print(
            f"vs paper     parameters {info['params'] / paper_params - 1:+.1%}, "
            f"GFLOPs {info['gflops_hrnet'] / paper_gflops - 1:+.1%} (2^30) "
            f"{info['gflops_1e9'] / paper_gflops - 1:+.1%} (1e9)"
            + ("" if input_size == (384, 288) else "  (the paper's figures are for 384x288)")
        )
    return 0


def _detect(args: argparse.Namespace) -> int:
    from autopose.models.detector import build_person_detector, detect_persons, list_images, write_detections

    images = list_images(args.images)
    if not args.weights.is_file():
        raise AutoposeError("detector weights file not found", path=args.weights, field="--weights")
    detector = build_person_detector(args.weights)
    detections = detect_persons(detector, images, score_thr=args.score_thr)
    write_detections(detections, args.out)
    print(f"{len(detections)} person boxes in {len(images)} images → {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from autopose.engine.evaluate_command import evaluate_checkpoint, evaluate_results_file

    if args.results is not None:
        extra = [
            flag
            for flag, value in (
                ("--checkpoint", args.checkpoint),
                ("--images", args.images),
                ("--dets", args.dets),
                ("--out", args.out),
            )
            if value is not None
        ]
        extra += ["--no-flip"] if args.no_flip else []
        if extra:
            raise AutoposeError(
                f"--results scores an existing results file; leave out {', '.join(extra)}", field="--results"
            )
        report = evaluate_results_file(args.results, args.ann)
    else:
        if args.checkpoint is None:
            raise AutoposeError(
                "give --checkpoint C --images DIR to run a model, or --results R.json to score a file",
                field="--checkpoint",
            )
        if args.images is None:
            raise AutoposeError("--checkpoint needs --images DIR (the images of --ann)", field="--images")
        report = evaluate_checkpoint(
            args.checkpoint,
            args.ann,
            args.images,
            dets_path=args.dets,
            flip=not args.no_flip,
            batch_size=args.batch_size,
            results_out=args.out,
            progress=sys.stderr.isatty(),
        )
    print(report.table())
    return 0


# -- platform -----------------------------------------------------------------------
def _search(args: argparse.Namespace) -> int:
    from autopose.platform.config import load_experiment

    experiment = load_experiment(args.config)  # every check happens here, before Ray starts
    from autopose.platform.compare import collect, format_methods, format_table, method_rows, read_selection
    from autopose.platform.selection import format_selection
    from autopose.platform.tracking import mlflow_ui_command
    from autopose.platform.tune import run_search

    name = args.experiment or experiment.experiment
    outcomes = run_search(
        experiment,
        name=args.experiment,
        address=args.address,
        resume=args.resume,
        say=lambda text: print(f"autopose: {text}", file=sys.stderr, flush=True),
    )
    if any(o.tracking for o in outcomes):
        # The tracking server is still away (run_search said so): the results come from Tune.
        for o in sorted(outcomes, key=lambda o: -1.0 if o.val_ap is None else -o.val_ap):
            ap = "-" if o.val_ap is None else f"{o.val_ap:.4f}"
            print(
                f"{o.kind}-{o.seed}  val_ap {ap}  {o.status}"
                + (f"  (MLflow: {o.tracking})" if o.tracking else "")
            )
        return 1 if any(o.status != "TERMINATED" for o in outcomes) else 0
    _, rows = collect(experiment.tracking_uri, name, search=name)
    print(format_table(name, rows))
    failed = [o for o in outcomes if o.status != "TERMINATED"]
    for outcome in failed:
        label = outcome.candidate or outcome.kind
        where = f" (traceback: {outcome.error_file})" if outcome.error_file else ""
        print(f"autopose: trial {label}-{outcome.seed} failed: {outcome.error}{where}", file=sys.stderr)
    print(f"MLflow: {mlflow_ui_command(experiment.tracking_uri)}")
    selection = read_selection(experiment, name)
    print(format_methods(method_rows(rows, selection)))
    if selection is not None:
        print(format_selection(selection))
        print(f"promote the selected: autopose promote {selection.winner.run_id}")
    else:
        finished = [
            r for r in rows if r.status == "FINISHED" and r.val_ap is not None and r.candidate is None
        ]
        if finished:  # no holdout split: val is all there is (a search with data.search_val selects)
            print(f"promote the best on val: autopose promote {finished[0].run_id}")
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from autopose.platform.compare import (
        check_plot_path,
        collect,
        format_methods,
        format_table,
        method_rows,
        plot,
        selection_of,
    )
    from autopose.platform.config import resolve_tracking_uri
    from autopose.platform.selection import format_selection

    if args.plot is not None:
        check_plot_path(args.plot)  # before reading the store
    uri = resolve_tracking_uri(args.tracking_uri)
    name, rows = collect(uri, args.experiment)
    print(format_table(name, rows))
    for search in sorted({r.search for r in rows}):
        searched = [r for r in rows if r.search == search]
        selection = selection_of(searched)
        if selection is not None:
            print(f"search {search}:")
            print(format_selection(selection))
        print(format_methods(method_rows(searched, selection)))
    if args.plot is not None:
        print(f"plot: {plot(name, rows, args.plot)}")
    return 0


def _print_training(outcome) -> None:
    ap = outcome.metrics.get("final_val_ap")
    print(f"full training run {outcome.run_id}: val AP {ap:.4f}" if ap is not None else outcome.run_id)
    print(f"checkpoint: {outcome.checkpoint}")
    print(
        f"model: {outcome.registered_model} version {outcome.model_version} (alias {outcome.alias!r}): "
        f"epoch {outcome.registered_epoch} of 0–{outcome.epochs - 1}, the best on val"
    )


def _promote(args: argparse.Namespace) -> int:
    from autopose.platform.config import load_experiment

    config = load_experiment(args.config) if args.config is not None else None
    from autopose.platform.promote import promote

    _print_training(promote(args.run_id, config=config, tracking_uri=args.tracking_uri, address=args.address))
    return 0


def _train(args: argparse.Namespace) -> int:
    from autopose.platform.config import load_experiment

    experiment = load_experiment(args.config)
    from autopose.platform.train import run_training

    _print_training(run_training(experiment, args.policy, address=args.address))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from autopose.platform.demo import run_demo

    run_demo(args.workdir, args.budget)
    return 0


ADDRESS_HELP = "Ray address (default: $RAY_ADDRESS, else a new local Ray)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autopose")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    from autopose.platform.config import BASELINE_KINDS

    parser = argparse.ArgumentParser(
        prog="autopose",
        description="Differentiable augmentation-policy search for top-down pose estimation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    demo = verbs.add_parser("demo", help="run the whole loop on bundled data (local Ray, SQLite MLflow)")
    demo.add_argument("--workdir", type=Path, default=Path("demo_run"), help="where everything is written")
    demo.add_argument("--budget", choices=["full", "tiny"], default="full", help="tiny: the test's budget")
    demo.set_defaults(handler=_demo)

    data = verbs.add_parser("data", help="datasets: synthetic data, Parquet proxy")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="DATA_COMMAND")
    synth = data_verbs.add_parser("synth", help="write a procedural COCO-format keypoint dataset")
    synth.add_argument("--out", type=Path, required=True, help="output folder (created)")
    synth.add_argument("--images", type=int, required=True, help="images in the train split")
    synth.add_argument(
        "--val-images", type=int, default=None, help="images in the val split (default: images/4)"
    )
    synth.add_argument("--seed", type=int, default=0, help="seeds the figures, poses and backgrounds")
    synth.add_argument(
        "--shift",
        default="none",
        help="val shift: none, or KEY=VALUE,... with keys rotate, scale, brightness, contrast, occlusion, "
        "blur, box_scale, box_offset (e.g. rotate=45,brightness=0.5)",
    )
    synth.add_argument("--size", default="240x320", help="image size HxW")
    synth.add_argument("--max-persons", type=int, default=3, help="figures per image: 1 to this many")
    synth.add_argument(
        "--holdout-images",
        type=int,
        default=0,
        help="images of a third split (OUT/holdout) drawn like val: for the search's policy step",
    )
    synth.add_argument(
        "--plain", action="store_true", help="smooth backgrounds and no occluders (an easier task)"
    )
    synth.set_defaults(handler=_data_synth)

    proxy = data_verbs.add_parser("build-proxy", help="cache person crops as a Parquet proxy")
    proxy.add_argument("--ann", type=Path, required=True, help="COCO keypoint json (or MPII json)")
    proxy.add_argument("--images", type=Path, required=True, help="image folder")
    proxy.add_argument("--out", type=Path, required=True, help="output .parquet file")
    proxy.add_argument("--max-images", type=int, default=5000, help="images drawn at most (default 5000)")
    proxy.add_argument("--seed", type=int, default=0, help="seeds the draw of the images")
    proxy.add_argument("--input", default="256x192", help="crop size HxW")
    proxy.add_argument(
        "--exclude",
        type=Path,
        help="a proxy whose images this one must not hold (a held-out split of the same images)",
    )
    proxy.add_argument(
        "--margin",
        type=float,
        default=1.0,
        help="store each crop on a canvas this many times its sides (1.5 for a train proxy: a "
        "policy's turns and zoom-outs then bring in the image around the person, not black)",
    )
    proxy.set_defaults(handler=_data_build_proxy)

    info = verbs.add_parser("model-info", help="parameters and GFLOPs of an architecture")
    info.add_argument("--arch", required=True, help="e.g. p2net_r50, p2net_r101_prog, simplebaseline_r50")
    info.add_argument("--input", default="256x192", help="input size HxW")
    info.add_argument("--joints", type=int, default=17, help="keypoints per person (COCO 17, MPII 16)")
    info.set_defaults(handler=_model_info)

    detect = verbs.add_parser("detect", help="person boxes with torchvision Faster R-CNN (local weights)")
    detect.add_argument("--images", type=Path, required=True, help="image folder (or one image)")
    detect.add_argument("--weights", type=Path, required=True, help="Faster R-CNN ResNet-50-FPN state dict")
    detect.add_argument("--out", type=Path, required=True, help="COCO detection json")
    detect.add_argument("--score-thr", type=float, default=0.0, help="keep boxes scored at least this")
    detect.set_defaults(handler=_detect)

    evaluate = verbs.add_parser("evaluate", help="COCO keypoint AP (or MPII PCKh)")
    evaluate.add_argument("--ann", type=Path, required=True, help="ground-truth annotation json")
    evaluate.add_argument("--checkpoint", type=Path, help="model checkpoint to run")
    evaluate.add_argument("--images", type=Path, help="image folder (with --checkpoint)")
    evaluate.add_argument("--dets", type=Path, help="person detections json (default: ground-truth boxes)")
    evaluate.add_argument("--results", type=Path, help="score an existing COCO results json instead")
    evaluate.add_argument("--no-flip", action="store_true", help="turn the flip test off")
    evaluate.add_argument(
        "--out", type=Path, help="also write the COCO results json here (with --checkpoint)"
    )
    evaluate.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    evaluate.set_defaults(handler=_evaluate)

    search = verbs.add_parser("search", help="Ray Tune experiment: policy search beside baselines")
    search.add_argument("--config", type=Path, required=True, help="experiment YAML (search_spaces/*.yaml)")
    search.add_argument("--experiment", help="MLflow experiment name (default: from the config)")
    search.add_argument("--address", help=ADDRESS_HELP)
    search.add_argument("--resume", action="store_true", help="finish an interrupted experiment")
    search.set_defaults(handler=_search)

    compare = verbs.add_parser("compare", help="table of searched and baseline policies from MLflow")
    compare.add_argument("--experiment", help="MLflow experiment name")
    compare.add_argument("--plot", type=Path, help="write a PNG of AP by policy kind")
    compare.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    compare.set_defaults(handler=_compare)

    promote = verbs.add_parser("promote", help="mark a run's policy promoted and train it fully")
    promote.add_argument("run_id", help="the MLflow run of a search trial or selection candidate")
    promote.add_argument("--config", type=Path, help="training config (default: the run's own)")
    promote.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the run's config's, else ./mlflow.db)"
    )
    promote.add_argument("--address", help=ADDRESS_HELP)
    promote.set_defaults(handler=_promote)

    train = verbs.add_parser("train", help="full training on Ray Train")
    train.add_argument(
        "--policy",
        required=True,
        help="policy or schedule JSON file, or one of " + " | ".join(BASELINE_KINDS),
    )
    train.add_argument("--config", type=Path, required=True, help="experiment YAML (its full_train section)")
    train.add_argument("--address", help=ADDRESS_HELP)
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except AutoposeError as error:
        print(f"autopose: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autopose: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
