// The BatchNorm tab (bnprobe): how the iframe talks to the TensorBoard page around it.
// Talking to the TensorBoard page around the iframe (its "experimental" plugin IPC, the one
// tensorboard/components/experimental/plugin_lib wraps): bootstrap a MessageChannel, then
// JSON messages {type, id, payload, error, isReply}. Types the host answers (TB 2.21):
// experimental.GetRuns, experimental.GetURLPluginData; it broadcasts experimental.RunsChanged
// and experimental.DataReloaded. Outside TensorBoard (iframe URL opened directly) nobody
// answers: callers must time out.
let port = null, nextId = 0;
const waits = new Map(), listeners = new Map();

function ensurePort() {
  if (port || window.parent === window) return port;
  const ch = new MessageChannel();
  port = ch.port1;
  port.addEventListener('message', async (ev) => {
    const m = JSON.parse(ev.data);
    if (m.isReply) {
      const w = waits.get(m.id); if (!w) return; waits.delete(m.id);
      m.error ? w.reject(new Error(m.error)) : w.resolve(m.payload); return;
    }
    let payload = null, error = null;
    const cb = listeners.get(m.type);
    if (cb) { try { payload = await cb(m.payload); } catch (e) { error = String(e); } }
    port.postMessage(JSON.stringify({ type: m.type, id: m.id, payload, error, isReply: true }));
  });
  port.start();
  window.parent.postMessage('experimental.bootstrap', '*', [ch.port2]);
  return port;
}

export function send(type, payload = null, timeoutMs = 2000) {
  if (!ensurePort()) return Promise.resolve(null);
  const id = nextId++;
  port.postMessage(JSON.stringify({ type, id, payload, error: null, isReply: false }));
  return new Promise((resolve, reject) => {
    waits.set(id, { resolve, reject });
    setTimeout(() => { if (waits.delete(id)) resolve(null); }, timeoutMs);
  });
}

export function listen(type, cb) { ensurePort(); listeners.set(type, cb); }
