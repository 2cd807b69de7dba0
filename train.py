"""Train one image classifier; under NNI, one trial of a search.

    python train.py                                    # demo data (made on first use) -> runs/exp
    python train.py --model efficientnet_b0 --pretrained --weights effnet_b0.pth --resize 224 224
    python train.py --data_dir /data/train --eval_dir /data/eval --criterion focal --focal_gamma 2
    python train.py --dataset ImageFolderDataset --data_dir flowers/train --eval_dir flowers/test
    python train.py --kfold 5 --fold 0 --name fold0
    python train.py --config runs/exp/config.json --epochs 20
    python train.py --resume runs/exp/last.pth         # continue a killed run in runs/exp
    nnictl create --config config_local.yml            # TPE search; train.py reports to NNI

Reads top to bottom: flags (training/flags.py), data, model, fit, predict. Under NNI, the trial's
parameters are merged over the flags (keys = flag dest names; Hyperband's and BOHB's TRIAL_BUDGET
sets --epochs), the run directory is $NNI_OUTPUT_DIR, and every epoch and the end are reported.
A finished run ends by writing summary.json, which the tools read.
"""
import contextlib
import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dataset
from core.cli import make_progress, run_main
from core.files import check_output
from core.figures import confusion_image, prediction_grid
from core.metrics import confusion, score, still_rising
from core.runs import (BEST, CONFIG, EPOCHS, HISTORY, RETRY_OF, SUBMISSION, TENSORBOARD, VAL_SOFT, increment_path, write_config, write_history,
                       write_submission, write_summary, write_val_soft)
from core.signals import STOP
from imagedata.layouts import DataError
from loss import create_criterion
from model import WeightsError, create_model, input_config, num_outputs
from optim import create_optimizer, create_scheduler, param_groups
from training import checkpoint, flags, tracking
from training.average import TopEpochs, greedy_soup, moving_average, recompute_batchnorm
from training.engine import (cpu_threads, evaluate, out_of_memory_says, pad_length, resolve_device, seed_everything, since_start,
                             train_one_epoch)
from training.predict import predict_images

# ----------------------------------------------------------------------------- the NNI contract
# As in NNI's own mnist example: parameters in at the start, a metric out every epoch, the best at the end.
UNDER_NNI = "NNI_PLATFORM" in os.environ  # set by NNI's trial keeper


def nni_parameters():
    import nni
    params = nni.get_next_parameter() or {}
    retried = params.get(RETRY_OF) or {}
    if retried.get("parameter_id") is not None:  # the tuner takes this result as the one the retried trial never sent
        import nni.trial
        nni.trial._params["parameter_id"] = retried["parameter_id"]
    return params


def trial_args(argv):
    """A trial's flags: NNI's parameters over the command line, and --resume of the last.pth it continues, if any."""
    params = nni_parameters()
    args = flags.parse_args(argv, params)
    last = None if args.resume else checkpoint.continued(Path(os.environ["NNI_OUTPUT_DIR"]), flags.run_config(args),
                                                         params.get(RETRY_OF))
    return flags.parse_args([*(sys.argv[1:] if argv is None else argv), "--resume", str(last)], params) if last else args


def report_epoch(metric, row):
    import nni
    nni.report_intermediate_result({"default": metric, "accuracy": row["val_accuracy"], "f1": row["val_f1"], "loss": row["val_loss"]})


def report_final(best):
    import nni
    nni.report_final_result(best)


def split_seed(args):
    """--reshuffle_val under NNI: every trial validates on its own people (Nagler et al. 2024), the split seeded
    by the trial's sequence number. Standalone, and for --kfold folds (which must partition alike), --seed."""
    if args.reshuffle_val and UNDER_NNI and not args.kfold:
        import nni
        return args.seed + nni.get_sequence_id()
    return args.seed


# ----------------------------------------------------------------------------- main
def main(args):
    """Data, model, run directory, fit, predict. Inputs are read and checked before anything is written."""
    if args.print_flags:
        print(json.dumps(flags.run_config(args)))
        return None, None
    startup = dict(imports_s=since_start())  # where a trial's time goes before it trains (docs/gpu.md)
    torch.set_num_threads(cpu_threads(args.threads))
    if not (args.resume or UNDER_NNI):  # those write into the run's own directory, not a new one under --model_dir
        check_output(f"--model_dir {args.model_dir}", args.model_dir, folder=True)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    split = split_seed(args)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    _, stats = input_config(args.model, args.resize, args.pretrained, args.weights)  # ImageNet weights: their own statistics
    data = dataset.load_training_data(
        dataset=args.dataset, data_dir=args.data_dir, eval_dir=args.eval_dir, age_bounds=args.age_bounds, val_ratio=args.val_ratio,
        seed=args.seed, kfold=args.kfold, fold=args.fold, resize=args.resize, stats=stats, augmentation=args.augmentation,
        sampler=args.sampler, batch_size=args.batch_size, valid_batch_size=args.valid_batch_size, num_workers=args.num_workers,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, device=device, split_seed=split, feed=args.feed,
        options=dataset.csv_options(vars(args)), magnitude=args.randaugment_magnitude, mixup=args.mixup, cutmix=args.cutmix,
        albumentations=args.albumentations)
    print(data.feed_note, flush=True)
    startup["data_s"] = since_start()
    if not args.epochs:  # the step budget, in whole epochs; config.json then records the epochs it became
        args.epochs = math.ceil(args.steps / len(data.train_loader))
        print(f"training {args.epochs} epochs: --steps {args.steps} at {len(data.train_loader)} steps per epoch", flush=True)
    model = create_model(args.model, num_outputs(args.classification, len(data.classes)), head=args.head, dropout=args.dropout,
                         init=args.init, pretrained=args.pretrained, weights=args.weights, freeze_backbone=args.freeze_backbone,
                         resize=args.resize)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    recipe = build_recipe(args, data, model, device)  # before compile: --ema's copy must be of the plain model
    if args.compile != "none":  # in place: its state_dict keeps the plain keys that checkpoints and the tools read
        model.compile(mode=args.compile)
    startup["model_s"] = since_start()
    run_dir, progress = open_run_dir(args, data, model, recipe, device)
    with tracking.open_trackers(args, run_dir, flags.run_config(args)) as trackers:  # summary.json sent to them at the end
        with checkpoint.interruption_says(run_dir), out_of_memory_says(args.batch_size):
            result = fit(args, data, model, recipe, run_dir, progress, device, trackers)
        with checkpoint.interruption_says(run_dir, "the eval prediction" if data.eval_ids is not None else "writing summary.json"):
            print(f"best val {args.metric} {result['best']['value']:.4f} -> {run_dir / BEST}", flush=True)
            if data.eval_ids is not None:
                predict_eval(args, data, model, recipe, run_dir, device)
        with checkpoint.interruption_says(run_dir, "writing summary.json"):
            write_summary(run_dir, dict(
                result, format=1, run_dir=str(run_dir.resolve()), model=args.model, classes=len(data.classes), under_nni=UNDER_NNI,
                train_images=len(data.train_loader.dataset), val_images=len(data.val_set), eval_images=len(data.eval_ids or ()),
                split_seed=split, feed=data.feed, startup=dict(startup, first_step_s=result["first_step_s"]), wall_s=since_start(),
                files=sorted(p.name for p in run_dir.iterdir())))
    return result["best"]["value"], run_dir


@dataclass
class Recipe:
    """How the run trains, beside the model: its loss, optimiser and schedule, mixed precision and --ema's average."""
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object           # LambdaLR (epoch schedules) or ReduceLROnPlateau
    amp_dtype: torch.dtype      # None without mixed precision
    scaler: torch.amp.GradScaler
    ema: torch.nn.Module        # --ema: timm's ModelEmaV3 (its .module is validated and saved as best.pth), else None


def build_recipe(args, data, model, device):
    optimizer = create_optimizer(args.optimizer, param_groups(model, args.lr, args.weight_decay, args.layer_decay),
                                 args.lr, args.weight_decay, args.momentum)
    amp_dtype = None
    if args.amp and device.type == "cuda":  # emulated bf16 (T4, V100) is slower than fp16 with loss scaling
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if args.sampler == "weighted" and args.criterion == "weighted_cross_entropy":  # balanced once, not twice
        print("weighted_cross_entropy with --sampler weighted: the sampler already draws every class alike, so the loss "
              "weighs them as drawn (equally)", flush=True)
    return Recipe(
        criterion=create_criterion(args.criterion, args.classification, focal_gamma=args.focal_gamma, smoothing=args.smoothing,
                                   class_counts=data.drawn_counts).to(device),
        optimizer=optimizer, amp_dtype=amp_dtype, scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        scheduler=create_scheduler(args.scheduler, optimizer, args.epochs, args.lr_decay_step, args.milestones, args.lr_gamma,
                                   args.warmup_epochs),
        ema=moving_average(model, args.ema, args.ema_warmup))


def open_run_dir(args, data, model, recipe, device):
    """The run directory (the resumed one, NNI's, or the next free runs/<name>) with config.json written,
    and where training stands (a resumed run's state is loaded first) -> (run_dir, checkpoint.Progress)."""
    progress = checkpoint.Progress()
    if args.resume:
        run_dir = Path(args.resume).parent
        progress = checkpoint.restore(args.resume, lr=args.lr, model=model, optimizer=recipe.optimizer, scheduler=recipe.scheduler,
                                      generators=data.generators, device=device, ema=recipe.ema)
        print(f"resuming {run_dir} at epoch {progress.epoch}" + (f": its {progress.epoch - 1} epochs are done, so only what comes "
              f"after training (val_soft.csv, figures, eval prediction, summary.json) is written" if progress.epoch > args.epochs
              else ""), flush=True)
    elif UNDER_NNI:
        run_dir = Path(os.environ["NNI_OUTPUT_DIR"])
    else:
        run_dir = increment_path(Path(args.model_dir) / args.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir / CONFIG, flags.run_config(args))
    return run_dir, progress


# ----------------------------------------------------------------------------- fit
def fit(args, data, model, recipe, run_dir, progress, device, trackers):
    """Train from progress.epoch to --epochs (or early stopping); checkpoints, history, TensorBoard, the trackers and NNI
    reports every epoch. -> the summary's training part: best metric and epoch, epochs, first-step time."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(run_dir / TENSORBOARD, purge_step=progress.epoch if args.resume else None)
    print(f"run dir {run_dir} | {len(data.train_loader.dataset)} train / {len(data.val_set)} val images, "
          f"{len(data.classes)} classes | {args.model} on {device}", flush=True)
    meta = checkpoint.describe(flags.run_config(args), data)
    top = TopEpochs(run_dir / EPOCHS, args.average_epochs, progress.history, f"val_{args.metric}")
    stopped = args.early_stopping and progress.stale >= args.early_stopping  # a resumed run that had stopped early stays stopped
    if stopped:
        print(f"early stopping: no better {args.metric} for {progress.stale} epochs, before this resume", flush=True)
    try:
        for epoch in range(progress.epoch, progress.epoch if stopped else args.epochs + 1):
            row, val, stats = run_epoch(args, data, model, recipe, epoch, device, first=epoch == progress.epoch)
            progress.first_step_s = stats.get("first_step_s", progress.first_step_s)
            metric = row[f"val_{args.metric}"]
            improved = progress.add(row, val, metric)
            with STOP.deferred():  # best.pth, last.pth and history.csv describe the same epoch, or none do
                checkpoint.save_epoch(run_dir, model, meta, improved=improved, epoch=epoch, best=progress.best,
                                      history=progress.history, optimizer=recipe.optimizer, scheduler=recipe.scheduler,
                                      stale=progress.stale, generators=data.generators, ema=recipe.ema)
                top.offer(epoch, metric, scored(model, recipe))
                write_history(run_dir / HISTORY, progress.history)
            log_row(writer, trackers, row)
            writer.flush()  # a stopped trial keeps its curves: dying by the signal skips writer.close()
            if UNDER_NNI:
                report_epoch(metric, row)
            if args.early_stopping and progress.stale >= args.early_stopping:
                print(f"early stopping: no better {args.metric} for {progress.stale} epochs", flush=True)
                break
        if args.average_epochs > 1:
            average_best_epochs(args, data, model, recipe, run_dir, meta, top, progress, device)
        if UNDER_NNI:  # before the figures and the eval prediction: a stop signal during those loses nothing
            with STOP.deferred():  # sent and marked sent, or neither
                report_final(progress.best)
                progress.final_sent = True
    except KeyboardInterrupt:
        if UNDER_NNI and progress.history and not progress.final_sent:  # an assessor's stop: the tuner (TPE) still learns how far this got
            with contextlib.suppress(Exception):  # whatever NNI says, the trial must still end by the signal
                report_final(progress.best)
        raise
    # Once, at the end: drawing the figures at every new best cost seconds per epoch.
    with checkpoint.interruption_says(run_dir, "writing val_soft.csv and the figures"):
        averaged = held_best(args, data, model, recipe, run_dir, progress, device)
        val = progress.best_outputs
        log_figures(writer, trackers, val["preds"], data.val_truth, data.val_set, data.classes, progress.best_epoch)
        write_val_soft(run_dir / VAL_SOFT, data.val_ids, data.val_truth, val["probs"], data.classes)
        writer.close()
    rising = warn_if_still_rising(args, [row[f"val_{args.metric}"] for row in progress.history])
    scores = val_scores(data, val)  # what best.pth holds, scored as the epochs were
    return dict(best=dict(metric=args.metric, value=progress.best, epoch=progress.best_epoch, val_accuracy=scores["accuracy"],
                          val_f1=scores["f1"]), epochs=len(progress.history), first_step_s=progress.first_step_s, still_rising=rising,
                averaged_epochs=averaged if args.average_epochs > 1 else None)


def held_best(args, data, model, recipe, run_dir, progress, device):
    """The epochs averaged into best.pth; progress holds its epoch and validation outputs after: this process's where it
    wrote best.pth, else (a resumed run that made nothing better, or had no epoch left to train) best.pth validated
    again, so that a resume writes every output the run would have. The model is the trained one no more after."""
    held = checkpoint.read(run_dir / BEST, device)
    if progress.best_outputs is None:
        model.load_state_dict(held["state_dict"])
        progress.best_epoch, progress.best_outputs = held["epoch"], validate(args, data, model, recipe, device)
    return held.get("averaged_epochs", [held["epoch"]])


def scored(model, recipe):
    """The weights validation scores and best.pth holds: the moving average with --ema, else the trained model."""
    return recipe.ema.module if recipe.ema is not None else model


def validate(args, data, weights, recipe, device):
    """The validation outputs of these weights (an epoch's, or an average of epochs)."""
    return evaluate(weights, data.val_loader, device=device, normalize=data.normalize, criterion=recipe.criterion,
                    classification=args.classification, amp_dtype=recipe.amp_dtype, channels_last=args.channels_last,
                    pad_to=pad_length(device, data.infer_batch))


def val_scores(data, val):
    """Validation outputs -> the scores on the data's own labels (accuracy, f1, and per task on the mask layout)."""
    return score(data.val_truth, val["preds"], len(data.classes), per_task=data.layout == "mask")


def average_best_epochs(args, data, model, recipe, run_dir, meta, top, progress, device):
    """--average_epochs: the best epochs' weights averaged greedily (training/average.py); when more than the best
    joined and the average scores no lower than progress.best (what best.pth holds: a resumed run's earlier average
    may be better), best.pth holds it and progress says so; the kept epochs' files are removed."""
    if len(top.kept) < 2:
        top.clear()
        return

    def score_of(soup):
        val = validate(args, data, soup, recipe, device)
        return val_scores(data, val)[args.metric], val
    soup = copy.deepcopy(scored(model, recipe))
    ranked = top.ranked()  # [(metric, epoch)], best first
    kept = greedy_soup([epoch for _, epoch in ranked], top.state, (ranked[0][0], None), soup, score=score_of,
                       recompute=lambda m: recompute_batchnorm(m, data.train_loader, data.normalize, device, recipe.amp_dtype,
                                                               args.channels_last))
    print(f"averaging the best epochs: {' + '.join(map(str, kept.members))} kept, val {args.metric} {kept.metric:.4f}"
          + ("" if kept.metric >= progress.best else f", below best.pth's {progress.best:.4f}: best.pth kept"), flush=True)
    if kept.state is not None and kept.metric >= progress.best:
        soup.load_state_dict(kept.state)
        with STOP.deferred():
            checkpoint.save(run_dir / BEST, soup, meta, epoch=kept.members[0], best_metric=kept.metric, averaged_epochs=kept.members)
        progress.best, progress.best_epoch, progress.best_outputs = kept.metric, kept.members[0], kept.outputs
    top.clear()


def run_epoch(args, data, model, recipe, epoch, device, first):
    """Train one epoch, validate, step the schedule -> (history row, validation outputs, training stats).
    A diverged model (non-finite validation loss or weights) stops the run before anything is saved."""
    t0, lr = time.time(), recipe.optimizer.param_groups[-1]["lr"]  # the LR this epoch trains at (the head's, at scale 1)
    train_stats = train_one_epoch(
        model, data.train_loader, device=device, augment=data.augment, normalize=data.normalize, criterion=recipe.criterion,
        optimizer=recipe.optimizer, scaler=recipe.scaler, classification=args.classification, amp_dtype=recipe.amp_dtype,
        channels_last=args.channels_last, clip_grad=args.clip_grad, progress=make_progress(f"epoch {epoch}/{args.epochs}"),
        log_first_step=first, ema=recipe.ema, mix=data.mix, steps_before=(epoch - 1) * len(data.train_loader))
    val = validate(args, data, scored(model, recipe), recipe, device)
    if not math.isfinite(val["loss"]) or not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise FloatingPointError(f"epoch {epoch}: validation loss is {val['loss']:.4g} and the weights are not all finite: "
                                 f"training diverged (try a lower --lr); nothing of this epoch was saved")
    scores = val_scores(data, val)
    recipe.scheduler.step(scores[args.metric]) if args.scheduler == "plateau" else recipe.scheduler.step()
    row = dict(epoch=epoch, train_loss=train_stats["loss"], train_accuracy=train_stats["accuracy"],
               train_images_per_s=train_stats["images_per_s"], val_loss=val["loss"], **{f"val_{k}": v for k, v in scores.items()},
               lr=lr, seconds=time.time() - t0)
    return row, val, train_stats


def warn_if_still_rising(args, values):
    """One warning line when the run should have trained longer -> whether it warned (for the summary)."""
    rise = still_rising(values)
    if rise:
        window, before, last = rise
        print(f"warning: val {args.metric} was still rising when training ended ({before:.4f} -> {last:.4f} over the "
              f"last {window} epochs): train longer, e.g. --epochs {2 * args.epochs}", file=sys.stderr, flush=True)
    return bool(rise)


# ----------------------------------------------------------------------------- predict
def predict_eval(args, data, model, recipe, run_dir, device):
    """best.pth on the eval dir -> submission.csv and submission_soft.csv in the run directory, predicted as validation
    scored it (autocast, memory format, batch length)."""
    best = checkpoint.read(run_dir / BEST, device)
    model.load_state_dict(best["state_dict"])
    probs = predict_images(model, best, data.eval_paths, device=device, batch_size=data.infer_batch, num_workers=args.num_workers,
                           cache_dir=args.cache_dir, use_cache=not args.no_cache, label="predicting", amp_dtype=recipe.amp_dtype,
                           channels_last=args.channels_last, pad_to=pad_length(device, data.infer_batch))
    write_submission(run_dir, data.eval_ids, probs, data.classes)
    print(f"wrote {run_dir / SUBMISSION} and submission_soft.csv ({len(data.eval_ids)} images)", flush=True)


# ----------------------------------------------------------------------------- logging
def log_row(writer, trackers, row):
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
    trackers.epoch(row)
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


def log_figures(writer, trackers, preds, truth, val_set, classes, epoch, n=16):
    """The best epoch's confusion matrix, and a grid of validation images titled prediction / truth."""
    picks = np.linspace(0, len(val_set) - 1, min(n, len(val_set))).astype(int)
    grid = prediction_grid([val_set[i][0].permute(1, 2, 0).numpy() for i in picks], [int(preds[i]) for i in picks],
                           [int(truth[i]) for i in picks], classes)
    figures = {"confusion_matrix": confusion_image(confusion(truth, preds, len(classes)), classes), "predictions": grid}
    for key, image in figures.items():
        writer.add_image(f"val/{key}", np.asarray(image), epoch, dataformats="HWC")
    trackers.images(figures, epoch)


# ----------------------------------------------------------------------------- entry point
def cli(argv=None):
    STOP.install()
    try:
        return run_main("train.py", lambda a: main(trial_args(a) if UNDER_NNI else flags.parse_args(a)), argv,
                        errors=(DataError, WeightsError, FloatingPointError, torch.OutOfMemoryError))
    except KeyboardInterrupt as e:
        notes = getattr(e, "__notes__", None) or ["stopped before training started"]
        print(f"train.py: interrupted; {' '.join(notes)}", file=sys.stderr, flush=True)
        # Die by the signal, as Python does for an uncaught Ctrl-C: NNI's trial keeper (remote mode)
        # calls any exit code a FAILED trial, and only an exit by signal a cancelled/early-stopped one.
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        sys.stdout.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum  # not reached unless the signal is blocked


if __name__ == "__main__":
    code = cli()
    if code:  # an error may leave loader workers that only the normal exit stops
        sys.exit(code)
    # Every file is written and closed by now. Skip the interpreter's teardown of torch's, nni's and
    # dynamo's modules: about a second of every NNI trial's slot on a small CPU (docs/speed.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
