"""--tracker: a run sent to Weights & Biases or MLflow as well as TensorBoard: its flags, every epoch's history row,
the confusion matrix and prediction grid, its summary, and with --tracker_checkpoint its best.pth.

    with tracking.open_trackers(args, run_dir, config) as trackers:   # one per --tracker name, TRACKERS
        trackers.epoch(row); trackers.images({"confusion_matrix": pil, ...}, epoch)
    # at the end: the run dir's summary.json (and best.pth with --tracker_checkpoint) sent, each run closed

A tracker that fails (its server down, no network) never fails the run: one warning line, then it is dropped,
and the run's own files still hold everything. Under NNI a trial's group is its experiment id and its name the trial
id, so a search's trials line up side by side; finalize's folds are grouped by finalist (their configuration).
The libraries are imported only when asked for: a run without --tracker never pays for them.
"""
import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path

from core.cli import UserError, one_line
from core.runs import BEST, SUMMARY, read_summary

# MLflow's HTTP client retries a dead server 7 times with doubling waits, minutes per call: a run waits seconds.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
INSTALL = {"wandb": "wandb", "mlflow": "mlflow-skinny (or mlflow, which adds its server)"}


def run_identity(args, run_dir, config):
    """-> {project, group, name, tags}: a standalone run is its run dir's name in --tracker_project; an NNI trial is its
    trial id in a group of its experiment id, a finalize fold its trial id and fold in a group of its finalist."""
    exp, trial = os.environ.get("NNI_EXP_ID"), os.environ.get("NNI_TRIAL_JOB_ID")
    if not exp:
        return dict(project=args.tracker_project, group=None, name=Path(run_dir).name, tags={})
    group, name, tags = exp, trial, {"nni_experiment": exp, "nni_trial": trial}
    if args.kfold:  # one finalist's folds differ only in these: the rest is its configuration
        same = {k: v for k, v in config.items() if k not in ("fold", "epochs", "name", "model_dir")}
        finalist = hashlib.sha1(json.dumps(same, sort_keys=True).encode()).hexdigest()[:8]
        group, name, tags = f"{exp}-{finalist}", f"{trial}-fold{args.fold}", dict(tags, finalist=finalist, fold=str(args.fold))
    return dict(project=args.tracker_project, group=group, name=name, tags=tags)


class WandbRun:
    """Weights & Biases: online with an API key and a reachable server, else offline into the run dir (`wandb sync`
    sends it later); WANDB_MODE, WANDB_PROJECT and the other WANDB_* variables win over what is chosen here."""
    title = "W&B"

    def __init__(self, run_dir, config, identity, uri=None):
        import wandb
        self.wandb = wandb
        mode = None if os.environ.get("WANDB_MODE") else "online" if wandb_online() else "offline"
        self.run = wandb.init(project=None if os.environ.get("WANDB_PROJECT") else identity["project"], group=identity["group"],
                              name=identity["name"], tags=[f"{k}:{v}" for k, v in identity["tags"].items()], config=config,
                              dir=str(run_dir), mode=mode, reinit="create_new")
        self.where = (f"offline in {Path(self.run.dir).parent} (`wandb sync` it later)" if self.run.settings._offline
                      else self.run.url)

    def epoch(self, row):
        self.run.log({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def images(self, images, epoch):  # at the step after the last epoch: W&B drops what is logged to a step before
        self.run.log({**{f"val/{k}": self.wandb.Image(v, caption=f"epoch {epoch}") for k, v in images.items()}, "best_epoch": epoch})

    def finish(self, summary, checkpoint=None):
        self.run.summary.update({k: v for k, v in summary.items() if k != "files"})
        if checkpoint is not None:
            artifact = self.wandb.Artifact(f"{self.run.id}-best", type="model")
            artifact.add_file(str(checkpoint))
            self.run.log_artifact(artifact)

    def close(self, status):
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def wandb_online():
    """An API key (WANDB_API_KEY or ~/.netrc) and W&B's server answering in 3 s."""
    import netrc
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if not netrc.netrc().authenticators(url.hostname):
                return False
        except (OSError, netrc.NetrcParseError):
            return False
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return False
    return True


class MlflowRun:
    """MLflow: an experiment per NNI experiment (else --tracker_project), a run per run dir or trial, its group a tag.
    --tracker_uri is the tracking server (http://host:5000) or store; by default a database file, --model_dir/mlflow.db."""
    title = "MLflow"

    def __init__(self, run_dir, config, identity, uri=None):
        for key, value in MLFLOW_HTTP.items():
            os.environ.setdefault(key, value)
        import mlflow
        from mlflow.entities import Param
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines on creating a database in every run's log
        self.client = mlflow.MlflowClient(uri)
        name = f"nni-{os.environ['NNI_EXP_ID']}" if os.environ.get("NNI_EXP_ID") else identity["project"]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:  # a database file keeps its runs' files beside it (MLflow's own default is ./mlruns, wherever that is)
                beside = Path(uri.removeprefix("sqlite:///")).parent / "mlruns" if uri.startswith("sqlite:///") else None
                experiment_id = self.client.create_experiment(name, artifact_location=beside and beside.as_uri())
            except mlflow.exceptions.MlflowException:  # a trial beside this one made it first
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        tags = dict(identity["tags"], **({"group": identity["group"]} if identity["group"] else {}))
        self.run_id = self.client.create_run(experiment_id, run_name=identity["name"], tags=tags).info.run_id
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in config.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.where = f"{uri} experiment {name}, run {self.run_id}"

    def epoch(self, row):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, row["epoch"]) for k, v in row.items() if k != "epoch"])

    def images(self, images, epoch):
        for key, image in images.items():
            self.client.log_image(self.run_id, image, artifact_file=f"val/{key}.png")

    def finish(self, summary, checkpoint=None):
        self.client.log_dict(self.run_id, summary, SUMMARY)
        if checkpoint is not None:
            self.client.log_artifact(self.run_id, str(checkpoint))

    def close(self, status):
        self.client.set_terminated(self.run_id, status=status)


TRACKERS = {"wandb": WandbRun, "mlflow": MlflowRun}


def default_uri(name, model_dir):
    """Where a tracker writes when --tracker_uri is not given: MLflow's database file in --model_dir (its file store, MLflow
    3's former default, now refuses to start unless MLFLOW_ALLOW_FILE_STORE is set)."""
    return f"sqlite:///{(Path(model_dir) / 'mlflow.db').resolve()}" if name == "mlflow" else None


def create_tracker(name, run_dir, config, identity, uri=None):
    if name not in TRACKERS:
        raise UserError(f"unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
    return TRACKERS[name](run_dir, config, identity, uri)


class Trackers:
    """The run's trackers, each call sent to each; one that raises is dropped with one warning line."""

    def __init__(self, runs):
        self.runs = runs

    def send(self, method, *args):
        for run in list(self.runs):
            try:
                getattr(run, method)(*args)
            except Exception as e:  # noqa: BLE001 - whatever the library or its server does, training goes on
                self.drop(run, f"{type(e).__name__}: {one_line(e)}")

    def drop(self, run, why):
        warn(f"{run.title} stopped tracking this run ({why[:300]}); training goes on, the run's own files keep everything")
        self.runs.remove(run)
        with contextlib.suppress(Exception):
            run.close("FAILED")

    def epoch(self, row):
        self.send("epoch", row)

    def images(self, images, epoch):
        self.send("images", images, epoch)

    def finish(self, summary, checkpoint=None):
        self.send("finish", summary, checkpoint)

    def close(self, status):
        for run in self.runs:
            with contextlib.suppress(Exception):
                run.close(status)
        self.runs = []


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def open_trackers(args, run_dir, config):
    """The run's trackers (none without --tracker), each started or dropped with one warning line; closed at the end as
    FINISHED, FAILED or KILLED (an interrupted run)."""
    runs = []
    identity = run_identity(args, run_dir, config) if args.tracker else None
    for name in dict.fromkeys(args.tracker or ()):
        try:
            run = create_tracker(name, run_dir, config, identity, args.tracker_uri or default_uri(name, args.model_dir))
        except ImportError:
            warn(f"--tracker {name}: the {name} package is not installed (pip install {INSTALL[name]}); training goes on without it")
            continue
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start never stops the run
            warn(f"--tracker {name}: could not start ({type(e).__name__}: {one_line(e)[:300]}); training goes on without it")
            continue
        print(f"tracking with {run.title}: {run.where}", flush=True)
        runs.append(run)
    trackers = Trackers(runs)
    try:
        yield trackers
    except KeyboardInterrupt:
        trackers.close("KILLED")
        raise
    except BaseException:
        trackers.close("FAILED")
        raise
    if (Path(run_dir) / SUMMARY).is_file():  # the run finished: what the tools read of it, and its best.pth if asked
        trackers.finish(read_summary(run_dir), Path(run_dir) / BEST if args.tracker_checkpoint else None)
    trackers.close("FINISHED")
