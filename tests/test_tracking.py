"""--tracker: runs sent to MLflow (a real `mlflow server` on 127.0.0.1, read back through MLflow's client) and W&B
(offline, its run file read back with wandb's own reader); a tracker that fails never fails the run."""
import contextlib
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import read_csv
from core.cli import UserError
from training import flags, tracking

mlflow = pytest.importorskip("mlflow")
EPOCHS = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root):
    """A real MLflow tracking server on 127.0.0.1 over a database in root -> its URI; stopped at the end."""
    root.mkdir()
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", (root / "artifacts").as_uri(),
                               "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), start_new_session=True,
                              env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))  # six idle job processes less
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert server.poll() is None, (root / "server.log").read_text()
            time.sleep(0.2)
        yield uri, server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def args_of(*words):
    return flags.parse_args(list(words))


# ----------------------------------------------------------------------------- in-process
def test_a_standalone_run_is_its_run_dir_in_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv("NNI_EXP_ID", raising=False)
    identity = tracking.run_identity(args_of("--tracker_project", "masks"), tmp_path / "exp3", {})
    assert identity == dict(project="masks", group=None, name="exp3", tags={})


def test_a_trial_is_grouped_by_its_experiment_and_folds_by_their_finalist(monkeypatch, tmp_path):
    monkeypatch.setenv("NNI_EXP_ID", "abc123")
    monkeypatch.setenv("NNI_TRIAL_JOB_ID", "Trial7")
    trial = tracking.run_identity(args_of(), tmp_path, flags.run_config(args_of()))
    assert (trial["group"], trial["name"], trial["tags"]) == ("abc123", "Trial7", {"nni_experiment": "abc123", "nni_trial": "Trial7"})

    def fold(*words):
        args = args_of("--kfold", "5", *words)
        return tracking.run_identity(args, tmp_path, flags.run_config(args))
    first, second, other = fold("--fold", "0"), fold("--fold", "3"), fold("--fold", "0", "--lr", "0.01")
    assert first["group"] == second["group"] != other["group"]
    assert first["group"].startswith("abc123-") and first["name"] == "Trial7-fold0" and second["tags"]["fold"] == "3"


def test_an_unknown_tracker_is_refused_listing_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown tracker 'tensorbored'; valid: wandb, mlflow"):
        tracking.create_tracker("tensorbored", tmp_path, {}, {})
    with pytest.raises(SystemExit):
        args_of("--tracker", "tensorbored")


def test_mlflow_default_store_holds_flags_epochs_figures_and_summary(monkeypatch, tmp_path):
    from PIL import Image
    monkeypatch.delenv("NNI_EXP_ID", raising=False)
    args = args_of("--tracker", "mlflow", "--model_dir", str(tmp_path / "runs"))
    config = flags.run_config(args)
    with tracking.open_trackers(args, tmp_path / "runs" / "exp", config) as trackers:
        for epoch in (1, 2):
            trackers.epoch(dict(epoch=epoch, train_loss=1.0 / epoch, val_f1=0.5 + epoch / 10, lr=0.001))
        trackers.images({"confusion_matrix": Image.new("RGB", (8, 8))}, 2)
        trackers.finish({"best": {"value": 0.7}, "files": ["best.pth"]})
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
    assert run.info.run_name == "exp" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_f1")] == [(1, 0.6), (2, 0.7)]
    assert run.data.params["model"] == "BaseModel" and run.data.params["tracker"] == '["mlflow"]'
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "val"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "val")] == ["val/confusion_matrix.png"]


def test_a_tracker_that_fails_is_dropped_with_one_warning_and_the_rest_goes_on(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("NNI_EXP_ID", raising=False)
    args = args_of("--tracker", "mlflow", "--model_dir", str(tmp_path / "runs"))
    with tracking.open_trackers(args, tmp_path / "runs" / "exp", flags.run_config(args)) as trackers:
        trackers.epoch(dict(epoch=1, val_f1=0.5))
        trackers.epoch(dict(epoch=2, **{"val_f1?": 0.6}))  # MLflow refuses the name: the run goes on without MLflow
        assert trackers.runs == []
        trackers.epoch(dict(epoch=3, val_f1=0.7))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow stopped tracking this run (MlflowException: ")
    assert warnings[0].endswith("training goes on, the run's own files keep everything")


def test_a_tracker_not_installed_is_one_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, as where it is not installed
    args = args_of("--tracker", "wandb")
    with tracking.open_trackers(args, tmp_path, flags.run_config(args)) as trackers:
        assert trackers.runs == []
    assert capsys.readouterr().err == ("warning: --tracker wandb: the wandb package is not installed (pip install wandb); "
                                       "training goes on without it\n")


# ----------------------------------------------------------------------------- train.py
def wandb_records(run_dir):
    """The records of the one offline W&B run in run_dir -> {kind: [record, ...]}. wandb 0.31 reads its run files in its Go
    core only: this reads the file's framing as its former Python reader did (LevelDB's log: 32 KiB blocks of chunks,
    each a 7-byte header) and parses each record with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2
    [path] = Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    records, pos, pending = {}, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in a block for a header: padding
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.setdefault(record.WhichOneof("record_type"), []).append(record)
            pending = b""
    return records


def key(item):
    """A W&B record item's key, plain or nested."""
    return item.key or "/".join(item.nested_key)


@pytest.mark.slow
def test_train_logs_to_an_mlflow_server_and_to_wandb_offline(run_train, tmp_path):
    pytest.importorskip("wandb")
    with mlflow_server(tmp_path / "mlflow") as (uri, _):
        proc = run_train("--epochs", EPOCHS, "--tracker", "mlflow", "wandb", "--tracker_uri", uri, "--tracker_checkpoint")
        client = mlflow.MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
        run_dir = tmp_path / "runs" / "exp"
        assert run.info.run_name == "exp" and run.info.status == "FINISHED"
        history = [float(row["val_loss"]) for row in read_csv(run_dir / "history.csv")]
        logged = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in logged] == list(range(1, EPOCHS + 1)) and len(history) == EPOCHS
        assert set(run.data.metrics) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1", "lr"}
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert names >= {"summary.json", "best.pth", "val"}
    assert "warning" not in proc.stderr
    records = wandb_records(run_dir)
    [run] = [r.run for r in records["run"]]
    assert (run.project, run.display_name) == ("imgcls", "exp")
    assert {i.key: i.value_json for i in run.config.update}["model"] == '"BaseModel"'
    logged = [{key(item): item.value_json for item in r.history.item} for r in records["history"]]
    assert [json.loads(row["val_loss"]) for row in logged[:EPOCHS]] == pytest.approx(history)
    assert logged[-1]["val/confusion_matrix/_type"] == logged[-1]["val/predictions/_type"] == '"image-file"'
    summary = {key(item) for r in records["summary"] for item in r.summary.update}
    assert {"best", "wall_s", "epochs", "val_f1"} <= summary
    assert list(Path(run_dir, "wandb").glob("offline-run-*/files/media/images/val/confusion_matrix_*.png"))


def logged_epochs(root):
    """How many epochs' val_f1 the server in root holds, read from its database."""
    with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(root / "mlflow.db", timeout=5)) as db:
        return db.execute("SELECT COUNT(*) FROM metrics WHERE key = 'val_f1'").fetchone()[0]
    return 0


@pytest.mark.slow
def test_an_mlflow_server_stopped_mid_run_costs_one_warning_and_nothing_else(run_train, tmp_path):
    root, epochs = tmp_path / "mlflow", 4
    with mlflow_server(root) as (uri, server):
        def stop_after_the_first_epoch():
            deadline = time.time() + 240
            while not logged_epochs(root) and time.time() < deadline:
                time.sleep(0.05)
            os.killpg(server.pid, signal.SIGKILL)
        stopper = threading.Thread(target=stop_after_the_first_epoch)
        stopper.start()
        try:
            proc = run_train("--epochs", epochs, "--tracker", "mlflow", "--tracker_uri", uri)
        finally:
            stopper.join()
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow stopped tracking this run ("), proc.stderr
    run_dir = tmp_path / "runs" / "exp"
    assert len((run_dir / "history.csv").read_text().splitlines()) == epochs + 1
    assert {"best.pth", "last.pth", "summary.json", "submission.csv"} <= {p.name for p in run_dir.iterdir()}
    assert 1 <= logged_epochs(root) < epochs  # what the server took before it stopped stays there
