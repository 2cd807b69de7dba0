"""Averaged weights: --ema's moving average, the mean of state dicts, BatchNorm statistics recomputed for them, and a
run's best epochs kept for --average_epochs (AutoGluon's top-3 checkpoint averaging: a greedy model soup inside one
run). search/soup.py averages across finalists with the same greedy soup."""
import shutil
from dataclasses import dataclass

import torch

from core.files import load_untrusted, replace_atomically
from training.engine import model_input


def moving_average(model, decay, warmup):
    """--ema: timm's ModelEmaV3 of the model (a copy, updated after every step), or None when decay is 0."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3  # timm takes a second or two to import: only when asked
    return ModelEmaV3(model, decay=decay, use_warmup=warmup)


def averaged(states):
    """The mean of state dicts; integer tensors (BatchNorm's counters) are the first's."""
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
            for k, v in states[0].items()}


@torch.no_grad()
def recompute_batchnorm(model, batches, normalize, device, amp_dtype=None, channels_last=False):
    """Averaged weights need the statistics of their own activations: a cumulative mean over the batches (training
    images, unaugmented; under the training's autocast and memory format, so a GPU meets no new kernel shape), the
    model left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(model_input(x, device, normalize, channels_last))
    model.eval()


class TopEpochs:
    """The weights of a run's best k epochs by the validation metric, on disk as they come (a file per epoch in
    folder, each dropped when k better ones are there), so a resumed run still has them. Ties go to the earlier epoch."""

    def __init__(self, folder, k, history=(), metric="val_accuracy"):
        self.folder, self.k = folder, k
        on_disk = {int(p.stem.removeprefix("epoch")) for p in folder.glob("epoch*.pth")} if folder.is_dir() else set()
        self.kept = [(row[metric], row["epoch"]) for row in history if row["epoch"] in on_disk]  # a resumed run's

    def ranked(self):
        """-> [(metric, epoch)], best first."""
        return sorted(self.kept, key=lambda m_e: (-m_e[0], m_e[1]))

    def path(self, epoch):
        return self.folder / f"epoch{epoch}.pth"

    def offer(self, epoch, metric, model):
        """Keep this epoch's weights if it is among the best k so far."""
        if self.k < 2:
            return
        ranked = self.ranked()
        if len(ranked) == self.k and (-metric, epoch) >= (-ranked[-1][0], ranked[-1][1]):
            return
        self.folder.mkdir(exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        replace_atomically(self.path(epoch), lambda tmp: torch.save(state, tmp))
        self.kept.append((metric, epoch))
        if len(self.kept) > self.k:
            _, dropped = self.ranked()[-1]
            self.kept = [(m, e) for m, e in self.kept if e != dropped]
            self.path(dropped).unlink(missing_ok=True)

    def state(self, epoch):
        return load_untrusted(self.path(epoch), f"epoch {epoch}'s weights")

    def clear(self):
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Soup:
    """What greedy_soup kept."""
    members: list        # the ingredients averaged, the best first
    metric: float        # the average's score (the best's own where none joined)
    outputs: object      # score()'s outputs for the average (the best's own where none joined)
    state: dict = None   # the average's weights, BatchNorm recomputed; None where none joined


def greedy_soup(ranked, state_of, first, soup, recompute, score, log=None):
    """A greedy model soup (Wortsman et al. 2022): the best ingredient, then each next joining the average only when the
    averaged weights (BatchNorm recomputed) score no lower. Used by --average_epochs over a run's best epochs and by
    finalize's soup over finalists. ranked: ingredients, best first; state_of(ingredient) -> its state dict; first:
    (metric, outputs) of the best alone; soup: a model to load the averages into; score(model) -> (metric, outputs);
    log(members, candidate, metric, best) after each try -> Soup."""
    states = {}
    members, (best, outputs), state = [ranked[0]], first, None
    for candidate in ranked[1:]:
        for name in (*members, candidate):
            if name not in states:
                states[name] = state_of(name)
        soup.load_state_dict(averaged([states[n] for n in (*members, candidate)]))
        recompute(soup)
        metric, tried = score(soup)
        if log:
            log(members, candidate, metric, best)
        if metric >= best:
            members, best, outputs, state = [*members, candidate], metric, tried, {k: v.clone() for k, v in soup.state_dict().items()}
    return Soup(members, best, outputs, state)
