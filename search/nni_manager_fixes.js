// Loaded into NNI 3.0's manager before its main.js (`node --require`, put in NODE_OPTIONS by search/nnictl.py):
// fixes for a remote server lost mid-search, where the stock manager keeps the server's trials RUNNING for good.
//
// 1. The manager pings each server's trial keeper every 5 s over a WebSocket. Stock WsConnection.heartbeat logs
//    "Missing pong", and after 4 of them sends a no-op and, once the send succeeds, counts from 0 again: a send
//    succeeds whenever the kernel takes the bytes, so a server that went silent (hung, cut off the network, powered
//    off) is never found lost. Here a connection with no pong for IMGCLS_LOST_AFTER_S seconds (default 60) is
//    dropped, which NNI then handles as it handles a closed socket: time for the keeper to reconnect (NNI's 30 s,
//    or IMGCLS_LOST_AFTER_S where that is shorter), then the worker is restarted over SSH.
// 2. That restart ends the lost worker's trials with no exit code, which NNI lists as USER_CANCELED, as if a person
//    had stopped them: here they end with exit code 255 (ssh's own for a lost connection), so they are FAILED and
//    `imgcls-experiment --retry-failed` takes them.
// 3. A restart that cannot reach the server left the new worker in the service's lists; the next environment update
//    would offer it to the scheduler, and a trial sent there would wait for good. Here it is removed.
'use strict';
const Module = require('module');
const path = require('path');

const LOST_AFTER_MS = 1000 * Number(process.env.IMGCLS_LOST_AFTER_S || 60);
const LOST_EXIT_CODE = 255;
// the manager's own children start without these fixes
process.env.NODE_OPTIONS = (process.env.NODE_OPTIONS || '').replace(`--require "${__filename}"`, '').trim();

function fixConnection({ WsConnection }) {
    const proto = WsConnection.prototype;
    const { handlePong, heartbeat } = proto;
    proto.handlePong = function () {
        this.unansweredSince = undefined;
        return handlePong.call(this);
    };
    proto.heartbeat = function () {  // a ping each beat: lost when the first one not answered is LOST_AFTER_MS old
        const silent = this.unansweredSince === undefined ? 0 : Date.now() - this.unansweredSince;
        if (silent < LOST_AFTER_MS) {
            this.unansweredSince ??= Date.now();
            return heartbeat.call(this);
        }
        this.log.error(`No pong for ${Math.round(silent / 1000)} s: the peer is lost, dropping the connection ` +
                       '(imgcls fix; IMGCLS_LOST_AFTER_S)');
        clearInterval(this.heartbeatTimer);
        this.heartbeatTimer = null;
        this.ws.terminate();  // 'close' (1006): the channel treats it as a socket the peer closed
    };
}

function fixChannel({ WsChannel, UnitTestHelper }) {
    const grace = Math.min(30000, LOST_AFTER_MS);
    UnitTestHelper.setTerminateTimeout(grace);  // NNI's own setter of its 30 s
    const { terminate } = WsChannel.prototype;
    WsChannel.prototype.terminate = function (reason) {  // its log line says 30 s whatever the time
        return terminate.call(this, String(reason).replace('in 30s', `in ${grace / 1000}s`));
    };
}

function fixRemote({ RemoteTrainingServiceV3 }) {
    const proto = RemoteTrainingServiceV3.prototype;
    const { stopWorker, launchWorker } = proto;
    proto.stopWorker = function (oldWorker, emitEnvUpdate) {
        const now = Date.now();
        for (const [trialId, worker] of this.workersByTrial) {
            if (worker === oldWorker) {
                this.log.error(`Trial ${trialId} FAILED: its worker ${oldWorker.config.host} is lost (imgcls fix)`);
                this.workersByTrial.delete(trialId);
                this.emitter.emit('trial_stop', trialId, now, LOST_EXIT_CODE);
            }
        }
        return stopWorker.call(this, oldWorker, emitEnvUpdate);
    };
    proto.launchWorker = async function (config) {
        const before = new Set(this.workers);
        try {
            return await launchWorker.call(this, config);
        } catch (error) {
            for (const worker of this.workers.filter(w => !before.has(w))) {
                this.workersByChannel.delete(worker.channelId);
                this.workersByEnv.delete(worker.envId);
            }
            this.workers = this.workers.filter(w => before.has(w));
            throw error;
        }
    };
}

const FIXES = {
    [path.join('common', 'command_channel', 'websocket', 'connection.js')]: fixConnection,
    [path.join('common', 'command_channel', 'websocket', 'channel.js')]: fixChannel,
    [path.join('training_service', 'remote_v3', 'remote.js')]: fixRemote,
};
const load = Module._load;
Module._load = function (request, parent, isMain) {
    const exported = load.apply(this, arguments);
    let file = '';
    try {
        file = Module._resolveFilename(request, parent, isMain);
    } catch {
        return exported;
    }
    for (const [suffix, fix] of Object.entries(FIXES)) {
        if (file.endsWith(path.sep + suffix)) {
            delete FIXES[suffix];
            fix(exported);
        }
    }
    return exported;
};
