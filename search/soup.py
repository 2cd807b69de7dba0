"""finalize --select soup: model soups (Wortsman et al., ICML 2022). Per fold, the weights of finalists that share
a backbone and input size are averaged greedily: the ingredients in order of their held-out F1 on that fold, each
kept when the averaged weights, BatchNorm statistics recomputed on that fold's training images, do not score
lower on the fold's held-out images. The K soups are then soft-voted on the eval dir: one model's inference
cost per fold, where a greedy ensemble pays one per member."""
from pathlib import Path

import numpy as np

import dataset
from core import demo
from core.cli import UserError
from core.folds import join_folds
from core.metrics import score
from core.runs import BEST, SOUP, VAL_SOFT
from core.submissions import alignment, read_val_soft
from imagedata.augment import Normalize
from imagedata.layouts import read_eval
from training import checkpoint, flags
from training.average import greedy_soup, recompute_batchnorm
from training.engine import resolve_device
from training.predict import fold_split, image_loader, predict_images


def shape_of(meta):
    """What averaged weights must share: the flags their shapes depend on, and the classes and input statistics."""
    return tuple(str(meta["args"][k]) for k in flags.having("shape")) + tuple(str(meta[k]) for k in ("classes", "mean", "std"))


def ingredients(run_dir, finalists, winner, k):
    """The finalists whose fold checkpoints have the winner's backbone, head, input size and input statistics, and
    whose folds held out the winner's images, fold by fold (another --seed splits otherwise): a soup averages
    models of one fold, and scores them on that fold's held-out images."""
    def fold_of(name, i):
        folder = run_dir / name / f"fold{i}"
        return shape_of(checkpoint.read_meta(folder / BEST)), sorted(read_val_soft(folder / VAL_SOFT)[0])
    wanted = [fold_of(winner, i) for i in range(k)]
    return [f.name for f in finalists if all(fold_of(f.name, i) == wanted[i] for i in range(k))]


class Fold:
    """One fold's images as its runs trained on them: the split rebuilt from a checkpoint's own flags, checked against
    what every ingredient's fold held out."""

    def __init__(self, meta, device, fold_dirs, batch_size=128):
        a = meta["args"]
        data_dir, eval_dir = demo.data_dirs(a["data_dir"], a.get("eval_dir"), make=False)
        if not Path(data_dir).is_dir():
            raise UserError(f"--select soup recomputes BatchNorm statistics on each fold's training images, and the folds' "
                            f"data dir {data_dir} is not on this machine: run finalize where the data is, or pick --select "
                            f"winner or greedy")
        _, data, self.train_idx, self.val_idx, self.ids = fold_split(meta, fold_dirs)
        self.paths, self.labels, self.size, self.eval_dir, self.meta = data["paths"], data["truth"], tuple(meta["resize"]), eval_dir, meta
        self.images = dataset.load_images(self.paths, self.size, a["cache_dir"], not a["no_cache"])
        self.device, self.batch_size = device, batch_size

    def held_out(self, model, classification):
        """-> (probs of the held-out images, their macro F1)."""
        probs = predict_images(model, dict(self.meta, classification=classification), self.paths, device=self.device,
                               images=self.images, indices=self.val_idx, batch_size=self.batch_size, num_workers=0)
        return probs, score(self.labels[self.val_idx], probs.argmax(1), probs.shape[1])["f1"]

    def recompute_batchnorm(self, model):
        """BatchNorm statistics of the averaged weights, over this fold's training images."""
        recompute_batchnorm(model, image_loader(self.paths, self.size, self.images, indices=self.train_idx, batch_size=self.batch_size,
                                                num_workers=0, device=self.device),
                            Normalize(self.meta["mean"], self.meta["std"]).to(self.device), self.device)


def fold_soup(run_dir, names, k, device, log):
    """Greedy soup on fold k over the ingredient finalists -> (soup's members, held-out F1, held-out probs, Fold, model, meta)."""
    loaded = {n: checkpoint.load_model(run_dir / n / f"fold{k}" / BEST, device) for n in names}
    fold = Fold(loaded[names[0]][1], device, [run_dir / n / f"fold{k}" for n in names])
    scored = {n: fold.held_out(model, ckpt["classification"]) for n, (model, ckpt) in loaded.items()}
    order = sorted(names, key=lambda n: -scored[n][1])  # stable: ties keep the finalists' rank order
    model, meta = loaded[order[0]]
    soup = checkpoint.build_model(meta).to(device)

    def said(members, candidate, f1, best):
        log(f"soup fold{k}: {'+'.join(members)} + {candidate}: held-out F1 {f1:.4f} against {best:.4f}"
            f" -> {'kept' if f1 >= best else 'left out'}")
    kept = greedy_soup(order, lambda n: loaded[n][1]["state_dict"], scored[order[0]][::-1], soup, fold.recompute_batchnorm,
                       lambda m: fold.held_out(m, meta["classification"])[::-1], log=said)
    if kept.state is not None:
        soup.load_state_dict(kept.state)
        model = soup
    return kept.members, kept.metric, kept.outputs, fold, model, meta


def save_soup(run_dir, i, model, meta, members):
    """fold<i>/soup.pth: the fold's soup as a checkpoint (the first ingredient's description, the averaged weights), so
    that export and inference can run what finalize voted -> its path relative to run_dir."""
    path = run_dir / f"fold{i}" / SOUP
    path.parent.mkdir(exist_ok=True)
    dropped = (*checkpoint.TRAINING_STATE, checkpoint.HASH_KEY, "epoch", "best_metric")  # the ingredient's, not the soup's
    checkpoint.save(path, model, dict({k: v for k, v in meta.items() if k not in dropped}, soup=members))
    return path.relative_to(run_dir).as_posix()


def soup_vote(run_dir, finalists, winner, k, eval_ids, log=print):
    """Every fold's greedy soup over the finalists shaped like the winner -> dict(members per fold, out-of-fold F1
    of the soups (optimistic: each chose on its fold), their eval probabilities, averaged, in eval_ids' order, the
    soups' checkpoints)."""
    device = resolve_device("auto")
    names = ingredients(run_dir, finalists, winner, k)
    parts, evals, members, saved = [], [], [], []
    for i in range(k):
        chosen, _, probs, fold, model, meta = fold_soup(run_dir, names, i, device, log)
        members.append(chosen)
        saved.append(save_soup(run_dir, i, model, meta, chosen))
        parts.append((f"soup fold{i}", i, fold.ids, fold.labels[fold.val_idx], probs))
        ids, paths = read_eval(fold.eval_dir, meta["layout"])
        probs = predict_images(model, meta, paths, device=device, batch_size=fold.batch_size, num_workers=0,
                               cache_dir=meta["args"]["cache_dir"], use_cache=not meta["args"]["no_cache"])
        evals.append(probs[alignment(eval_ids, ids, fold.eval_dir, "the finalists' eval predictions")])
    oof = join_folds(parts)
    return dict(ingredients=names, members=members, oof_f1=score(oof["labels"], oof["probs"].argmax(1), oof["probs"].shape[1])["f1"],
                eval_probs=np.mean(evals, axis=0), checkpoints=saved)
