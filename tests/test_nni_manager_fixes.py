"""search/nni_manager_fixes.js in NNI 3.0's own node and modules: a server that went silent is found lost and its
trials FAILED, against the stock behaviour shown beside it (the whole path, two sshd servers and one frozen, is
test_experiment_nni.py's remote test)."""
import os
import subprocess
from pathlib import Path

import nni_node
import pytest

from search import nnictl

NODE_DIR = Path(nni_node.__path__[0])

# A manager's WebSocket to a trial keeper whose server went silent (it takes every byte, never answers a ping), and
# the remote training service losing worker 2 with trial T1 on it, then failing to restart it.
SCRIPT = """
global.nniUnitTest = true;
const { globals } = require('common/globals/unittest');
globals.logStream.writeLine = globals.logStream.writeLineSync = line => console.log(line);
const EventEmitter = require('events');
const { WsConnection } = require('common/command_channel/websocket/connection');
const { RemoteTrainingServiceV3 } = require('training_service/remote_v3');
console.log('NODE_OPTIONS', JSON.stringify(process.env.NODE_OPTIONS || ''));

class SilentPeer extends EventEmitter {
    ping() {}
    send(data, callback) { if (callback) callback(); }
    terminate() { this.emit('close', 1006, Buffer.from('')); }
    close() {}
}
const connection = new WsConnection('keeper', new SilentPeer(), new EventEmitter());
connection.on('close', code => console.log('connection closed', code));
connection.setHeartbeatInterval(20);

const service = new RemoteTrainingServiceV3('remote', { machineList: [] });
const worker = { config: { host: 'gpu2' }, channelId: '2', envId: 'remote-worker2', env: {} };
service.workers.push(worker);
service.workersByChannel.set('2', worker);
service.workersByEnv.set('remote-worker2', worker);
service.workersByTrial.set('T1', worker);
service.onTrialEnd((trial, time, exitCode) => console.log('trial end', trial, exitCode));
service.stopWorker(worker, false);
service.launchWorker({ host: '127.0.0.1', port: 1, user: 'nobody' })
    .catch(() => console.log('restart failed, workers left', service.workers.length));
setTimeout(() => process.exit(0), 1500);
"""


def run(tmp_path, fixed):
    script = tmp_path / "lost.js"
    script.write_text(SCRIPT)
    env = dict(os.environ, NODE_PATH=f"{NODE_DIR}{os.pathsep}{NODE_DIR / 'node_modules'}", HOME=str(tmp_path),
               IMGCLS_LOST_AFTER_S="0.5", NODE_OPTIONS="--no-warnings")
    if fixed:
        env["NODE_OPTIONS"] += f' --require "{nnictl.MANAGER_FIXES}"'
    proc = subprocess.run([str(NODE_DIR / "node"), str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fixed", [False, True], ids=["stock", "fixed"])
def test_a_silent_server_is_found_lost_and_its_trials_fail(tmp_path, fixed):
    out = run(tmp_path, fixed)
    lines = out.splitlines()
    if not fixed:
        # 1.5 s of heartbeats every 20 ms: "Missing pong" all along, a no-op sent every 5th beat and its success taken
        # for an answer; never closed. The lost worker's trial ends with no exit code (listed USER_CANCELED), and the
        # worker that could not restart stays in the service's list
        assert out.count("Missing pong") > 20 and "connection closed" not in out, out
        assert "trial end T1 null" in lines and "restart failed, workers left 1" in lines, out
        return
    assert 'NODE_OPTIONS "--no-warnings"' in lines, out  # the manager's children start without the fixes
    assert "connection closed 1006" in lines and out.count("the peer is lost") == 1, out
    assert any("ERROR (WsConnection.keeper) No pong for" in line for line in lines), out
    assert "trial end T1 255" in lines and "restart failed, workers left 0" in lines, out
    assert "Trial T1 FAILED: its worker gpu2 is lost (imgcls fix)" in out


def test_nnictl_starts_the_manager_with_the_fixes(monkeypatch):
    """What patch_launcher hands the manager's node, and that nnictl's own environment is as it was."""
    seen = []
    for name in ("_check_rest_server", "_ensure_port_idle"):  # patched too: put back after the test
        monkeypatch.setattr(nnictl.launcher, name, getattr(nnictl.launcher, name))
    monkeypatch.setattr(nnictl.launcher, "_start_rest_server", lambda *a: seen.append(os.environ.get("NODE_OPTIONS")))
    monkeypatch.setenv("NODE_OPTIONS", "--max-http-header-size=65536")
    nnictl.patch_launcher()
    nnictl.launcher._start_rest_server(None, None)
    assert seen == [f'--max-http-header-size=65536 --require "{nnictl.MANAGER_FIXES}"']
    assert os.environ["NODE_OPTIONS"] == "--max-http-header-size=65536" and nnictl.MANAGER_FIXES.is_file()
