"""Export a model to one ONNX file that a runtime loads without this project: a checkpoint, several (soft-voted), or
a finalize run's selection (the winner's K folds, the greedy ensemble, the fold soups) as one graph.

    python baseline/export.py runs/exp/best.pth                          # -> runs/exp/best.onnx
    python baseline/export.py runs/finalize_EXP_ID                       # its selection -> runs/finalize_EXP_ID/winner.onnx
    python baseline/export.py runs/finalize_EXP_ID --select greedy --tta
    python baseline/export.py runs/exp/best.pth runs/exp2/best.pth --out runs/vote.onnx

The graph takes uint8 RGB images, NCHW, decoded as this project decodes them (upright, centre-cropped to the input's
aspect ratio, resized bilinearly to its H x W; the file's metadata says so and gives the size), with any batch size;
normalises them inside; runs every model; and answers `probs`, the selection's weighted mean of the class
probabilities: what finalize's submission_soft.csv holds. --tta puts the flip inside. Also inside, as metadata (JSON
values): the class names, the layout, the input sizes, mean/std, the members and their weights, the project's
version and what the file was exported from. A file is kept only if onnxruntime reproduces PyTorch's probabilities
(within 1e-4) on a batch. `inference.py --checkpoint FILE.onnx` runs it as it runs checkpoints. From a finalize run
dir, each checkpoint must be the one finalize voted: its finalist's command, on its fold. SIGINT or SIGTERM end an
export in one line, with no file half-written.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from core.cli import Parser, UserError, run_main
from core.files import check_output
from core.runs import BEST, CONFIG, FINALIZE_REPORT, read_report, voted_models
from core.signals import STOP
from search.finalists import differences, ran_configuration, without_length
from training import checkpoint, onnxfile
from training.engine import usable_cores


def build_parser():
    p = Parser(prog="export.py", description="Export a checkpoint, several (soft-voted), or a finalize run's selection to one "
                                             "ONNX file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", nargs="+", help="best.pth files (several are soft-voted alike), a train.py run dir, or a "
                                             "finalize run dir (runs/finalize_<EXP_ID>)")
    p.add_argument("--out", default=None, help="the .onnx file (default: beside a checkpoint, <name>.onnx; in a finalize run "
                                               "dir, <selection>.onnx)")
    p.add_argument("--select", default=None, choices=["winner", "greedy", "soup"],
                   help="a finalize run's selection to export (default: the one it voted into submission.csv)")
    p.add_argument("--tta", action="store_true", help="average the horizontally flipped view too, inside the graph")
    return p


def plan(args):
    """-> ([(checkpoint, weight)], the default output path, what it was exported from)."""
    sources = [Path(s) for s in args.source]
    if len(sources) == 1 and sources[0].is_dir():
        folder = sources[0]
        if (folder / BEST).is_file() and not (folder / FINALIZE_REPORT).is_file():  # a train.py run dir
            return [(folder / BEST, 1.0)], (folder / BEST).with_suffix(".onnx"), str(folder / BEST)
        if not (folder / FINALIZE_REPORT).is_file() and not any(folder.glob("*/fold0")):
            raise UserError(f"{folder}: neither a train.py run dir (no {BEST}) nor a finalize run dir (no {FINALIZE_REPORT}, "
                            f"no finalist's folds)")
        report = read_report(folder)
        select = args.select or report["select"]
        models = voted_models(folder, report, select)
        check_voted(folder, report, select, [path for path, _ in models])
        return models, folder / f"{select}.onnx", f"{folder} (finalize --select {select})"
    if args.select:
        raise UserError(f"--select {args.select}: picks from a finalize run dir, and {', '.join(map(str, sources))} is not one")
    for path in sources:
        if path.is_dir():
            raise UserError(f"{path}: a folder among checkpoints: give a finalize run dir alone, or its checkpoints")
        if onnxfile.is_onnx(path):
            raise UserError(f"{path}: an exported file, not a checkpoint (its metadata's members name the checkpoints it was "
                            f"exported from)")
    if len(sources) > 1 and args.out is None:
        raise UserError(f"{len(sources)} checkpoints are one vote: say where its file goes with --out FILE.onnx")
    return [(p, 1 / len(sources)) for p in sources], sources[0].with_suffix(".onnx"), " + ".join(map(str, sources))


def voted_folds(report, select):
    """(finalist, fold, the soup's members or None) of each checkpoint voted_models lists, in its order."""
    if select == "soup":
        return [(members[0], i, members) for i, members in enumerate(report["soup"]["members"])]  # the first's flags
    chosen = [report["winner"]] if select == "winner" else list(report["greedy_weights"])
    return [(name, i, None) for name in chosen for i in range(report["k"])]


def check_voted(run_dir, report, select, paths):
    """Each checkpoint is the one finalize voted: trained on its fold of K with its finalist's planned command (the
    report's; where it has none, the fold's config.json, as finalize checks each fold it votes), and a soup of the
    members it reports. A fold copied over another would export a file that does not reproduce the vote."""
    planned = {row.get("name"): row.get("config") for row in report.get("finalists", []) if isinstance(row, dict)}
    for path, (name, fold, soup) in zip(paths, voted_folds(report, select)):
        meta = checkpoint.read_meta(path)
        args, k = meta.get("args") or {}, report["k"]
        if (args.get("kfold"), args.get("fold")) != (k, fold):
            raise UserError(f"{path}: trained as fold {args.get('fold')} of {args.get('kfold') or 'none'}, not as {name}'s "
                            f"fold {fold} of {k}: finalize did not vote it (put its own fold back, or run finalize again)")
        folder = run_dir / name / f"fold{fold}"
        want = planned.get(name) or (ran_configuration(folder) if (folder / CONFIG).is_file() else None)
        ran = json.loads(json.dumps(without_length(args)))  # as config.json reads
        if want is not None and ran != want:
            raise UserError(f"{path}: trained with another command than {name}'s plan ({differences(want, ran)}): finalize "
                            f"did not vote it (put its own fold back, or run finalize again)")
        if soup is not None and meta.get("soup") != soup:
            raise UserError(f"{path}: a soup of {' + '.join(meta.get('soup') or ['?'])}, finalize voted one of "
                            f"{' + '.join(soup)} (run finalize --select soup again)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.out is not None and not onnxfile.is_onnx(args.out):
        raise UserError(f"--out {args.out}: name it *.onnx (inference tells an exported file by its suffix)")
    members, default_out, exported_from = plan(args)
    out = Path(args.out or default_out)
    check_output(f"--out {out}" if args.out else f"{out} (the default --out)", out)  # before the export, not after it
    onnxfile.export(members, out, tta=args.tta, exported_from=exported_from)
    return out


def cli(argv=None):
    torch.set_num_threads(usable_cores())
    STOP.install()  # SIGTERM as SIGINT: either one unwinds, so the temp file being written is removed
    try:
        return run_main("export.py", main, argv)
    except KeyboardInterrupt:
        print("export.py: interrupted: no file was left half-written", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
