// The page's controller: collects inputs (files, folders, or URLs: a file, or a folder manifest; urlinput.js) and
// options, asks a worker for the plan, runs the conversion in that same worker (or a fresh one if the options
// changed), shows progress, and offers the outputs (download links backed by OPFS files, one .zip of them all, or a
// folder export).
// State lives in `state`; the phase is mirrored on <body data-state> for styling and for the tests.
import { describeFiles, filesFromDrop, filesFromInput } from './entries.js';
import { displaySafe, formatBytes, formatDuration, progressLine } from './format.js';
import { holdJob, listAll, newJobId, outputHandle, removeJob, saveToFolder, sha256, sweepJobs } from './opfs.js';
import { hidePlan, showOutputs, showPlan } from './planview.js';
import { describeUrlInput, openUrl } from './urlinput.js';
import { crcsInWorker, outputFolderName, zipBlob } from './zipdownload.js';

const $ = (id) => document.getElementById(id);
const URL_CONTROLS = ['url-input', 'url-open', 'base-url-input', 'base-url-open'];
const query = new URLSearchParams(location.search);
// `?store=memory` forces the no-OPFS path (outputs kept as in-memory Blobs), to try what old browsers get.
const forceMemory = query.get('store') === 'memory';
// `?copiers=0` makes the OPFS writer copy unchanged ranges itself, as on engines without shared access handles.
const copiers = query.get('copiers') === '0' ? 0 : undefined;
const store = forceMemory ? 'memory' : 'opfs';
// `?hold=N` (tests only): the engine stops after N pieces until cancelled or released (ckptconvTest.release()), so a
// test can act on a job mid-way whatever the machine's speed.
const hold = Number(query.get('hold')) || undefined;

const state = {
  files: [], // [{path, file}] with Files, or [{path, url}] from a URL
  base: [],
  // Counts URL opens, so that only the latest of several still fetching is taken; `pending` are still fetching
  // (Convert waits for them: it would convert what they replace).
  opens: { files: 0, base: 0, pending: 0 },
  plan: null,
  planWorker: null,
  scanWorker: null,
  job: null, // {id, worker, release, store, outputs, urls, memoryFiles, blobs, zipName, zip}
};

function setPhase(phase) {
  document.body.dataset.state = phase;
  const busy = phase === 'converting';
  // Enabled while planning: a click on Convert blurs a just-edited option, which re-plans; the click must still count.
  // The conversion's own plan is the one that counts (see convert()).
  $('convert').disabled =
    busy || phase === 'invalid' || phase === 'needs-base' || state.files.length === 0 || state.opens.pending > 0;
  if (phase !== 'needs-base') $('choose-base').classList.remove('next-step');
  $('cancel').hidden = !busy;
  for (const id of ['choose-files', 'choose-folder', 'choose-base', 'clear-base', ...URL_CONTROLS]) {
    $(id).disabled = busy;
  }
  for (const el of $('options').elements) el.disabled = busy;
}

function showError(message) {
  $('error').hidden = !message;
  // The engine's messages are escaped already; a message from elsewhere (a file name in a drop) may not be.
  $('error').textContent = message ? `Error: ${displaySafe(message)}` : '';
}

function say(text) {
  $('status').textContent = text;
}

function readOptions() {
  const form = new FormData($('options'));
  const options = { dtype: form.get('dtype') || 'keep' };
  if (form.get('mode') === 'dcp-to-pt') options.mode = 'dcp-to-pt';
  if (form.get('lora')) options.lora = form.get('lora');
  const shard = String(form.get('maxShardSize') ?? '').trim();
  if (shard) options.maxShardSize = shard;
  // A file refused for a class off the allowlist names it and the flag; the user may allow it here.
  const allow = String(form.get('allowGlobals') ?? '')
    .split(/[\s,]+/)
    .filter(Boolean);
  if (allow.length) options.allowGlobals = allow;
  return options;
}

function spawnWorker() {
  return new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
}

/** The core's message for a Megatron folder planned without its base model (src/detect.rs). */
const NEEDS_BASE = /a Megatron checkpoint needs the base Hugging Face model/;

/** What a plan depends on besides the inputs (which reset it): the options. */
const planKey = (options) => JSON.stringify(options);

/** Re-plans whenever the inputs or options change; a newer request replaces an older one still running. */
function replan() {
  state.planWorker?.terminate();
  state.plan = null;
  const options = readOptions();
  state.requestedKey = planKey(options);
  showError('');
  if (state.files.length === 0) {
    hidePlan();
    $('plan-status').textContent = 'Choose a checkpoint to see what will be written.';
    return setPhase('idle');
  }
  setPhase('planning');
  $('plan-status').textContent = 'Reading the checkpoint…';
  const worker = spawnWorker();
  state.planWorker = worker;
  const drop = () => {
    worker.terminate();
    if (state.planWorker === worker) state.planWorker = null;
  };
  // On success the worker stays up holding the planned job, so Convert starts at once (see convert()).
  worker.onmessage = ({ data }) => {
    if (state.planWorker !== worker) return;
    if (data.type === 'plan') {
      state.plan = data.plan;
      state.planKey = planKey(options);
      showPlan(data.plan);
      $('plan-status').textContent = 'Ready to convert.';
      setPhase('ready');
    } else if (NEEDS_BASE.test(data.message) && state.base.length === 0) {
      // Not an error: a Megatron folder is read with its base model, which the user has not chosen yet.
      drop();
      hidePlan();
      $('plan-status').textContent =
        'This is a Megatron checkpoint. Next, choose its base model folder (the Hugging Face model it was trained ' +
        'from, with config.json and the tokenizer) under "Base model folder" in 2. Options, or give the URL of its ' +
        'manifest there.';
      setPhase('needs-base');
      $('choose-base').classList.add('next-step');
    } else {
      drop();
      hidePlan();
      $('plan-status').textContent = 'This input cannot be converted.';
      showError(data.message);
      setPhase('invalid');
    }
  };
  worker.onerror = (e) => {
    drop();
    showError(`the engine failed to start (${e.message || 'worker error'})`);
    setPhase('invalid');
  };
  // store and copiers let the worker start its OPFS writer while the plan is shown.
  worker.postMessage({ type: 'plan', files: state.files, base: state.base, options, store, copiers });
}

async function clearJob() {
  const job = state.job;
  if (!job) return;
  state.job = null;
  job.worker?.terminate();
  job.zip?.abort?.();
  for (const url of job.urls) URL.revokeObjectURL(url);
  $('outputs-section').hidden = true;
  if (job.store === 'opfs') await removeJob(job.id).catch(() => {});
  job.release();
}

async function convert() {
  if (state.files.length === 0 || state.opens.pending > 0 || document.body.dataset.state === 'converting') return;
  // Read before setPhase disables the form: FormData skips disabled controls.
  const options = readOptions();
  // Converting from the first moment, so a double click cannot start two jobs.
  setPhase('converting');
  const current = state.plan && state.planKey === planKey(options) ? state.plan : null;
  // The worker that planned these options already holds the job; any other plan is superseded.
  const warm = current ? state.planWorker : null;
  if (!warm) state.planWorker?.terminate();
  state.planWorker = null;
  await clearJob();
  showError('');
  const total = current ? current.outputs.reduce((n, o) => n + o.size, 0) : 0;
  if (current && !forceMemory && navigator.storage?.estimate) {
    const { quota = Infinity, usage = 0 } = await navigator.storage.estimate();
    if (quota - usage < total) {
      warm?.terminate();
      showError(
        `not enough browser storage: the output needs ${formatBytes(total)}, ${formatBytes(quota - usage)} is free`,
      );
      return setPhase('failed');
    }
  }
  const id = newJobId();
  const job = { id, store, plan: current, urls: [], memoryFiles: [], outputs: null };
  job.release = await holdJob(id);
  job.worker = warm ?? spawnWorker();
  state.job = job;
  $('progress-box').hidden = false;
  $('progress').value = 0;
  $('progress-text').textContent = current ? progressLine(0, total, 0) : '';
  say(current ? `Converting ${formatBytes(total)}…` : 'Converting…');
  $('plan-status').textContent = current ? 'Converting with this plan.' : 'Reading the checkpoint…';
  let tenth = 0;
  job.worker.onmessage = async ({ data }) => {
    if (state.job !== job) return;
    if (data.type === 'plan') {
      job.plan = state.plan = data.plan;
      state.planKey = planKey(options);
      showPlan(data.plan);
      $('plan-status').textContent = 'Converting with this plan.';
    } else if (data.type === 'progress') {
      $('progress').value = data.done / data.total;
      $('progress-text').textContent = progressLine(data.done, data.total, data.ms);
      const t = Math.floor((data.done / data.total) * 10);
      if (t > tenth) say(`Converting: ${(tenth = t) * 10}%`);
    } else if (data.type === 'file') {
      job.memoryFiles.push({ name: data.name, size: data.size, parts: [] });
      job.store = 'memory';
    } else if (data.type === 'chunk') {
      job.memoryFiles.at(-1).parts.push(data.bytes);
    } else if (data.type === 'done') {
      job.worker.terminate();
      job.worker = null;
      await finished(job, data).catch((e) => failed(job, `could not open the outputs: ${e.message}`));
    } else if (data.type === 'error') {
      await failed(job, data.message);
    }
  };
  job.worker.onerror = (e) => failed(job, `the engine stopped (${e.message || 'worker error'})`);
  if (warm) job.worker.postMessage({ type: 'run', jobId: id, store: job.store, copiers, hold });
  else
    job.worker.postMessage({
      type: 'convert',
      files: state.files,
      base: state.base,
      options,
      jobId: id,
      store: job.store,
      copiers,
      hold,
    });
}

async function finished(job, data) {
  job.outputs = job.plan.outputs;
  job.memoryFiles = job.memoryFiles.map((m) => ({ name: m.name, blob: new Blob(m.parts) }));
  const files = [];
  job.blobs = new Map();
  for (const o of job.outputs) {
    const mem = job.memoryFiles.find((m) => m.name === o.name);
    // OPFS Files are disk-backed: a link to one streams from disk, however big.
    const blob = mem ? mem.blob : await (await outputHandle(job.id, o.name)).getFile();
    job.blobs.set(o.name, blob);
    const url = URL.createObjectURL(blob);
    job.urls.push(url);
    files.push({ ...o, url });
  }
  showOutputs(files);
  // The inputs cannot change while converting: these are the ones the outputs came from.
  job.zipName = `${outputFolderName(state.files.map((f) => f.path))}.zip`;
  $('outputs-section').hidden = false;
  $('download-zip').hidden = files.length < 2;
  $('download-zip').disabled = false;
  $('save-folder').hidden = typeof window.showDirectoryPicker !== 'function';
  $('progress').value = 1;
  const secs = data.ms / 1000;
  $('progress-text').textContent =
    `${formatBytes(data.total)} in ${formatDuration(secs)} · ${formatBytes(data.total / Math.max(secs, 1e-3))}/s`;
  say(`Done: ${files.length} file${files.length === 1 ? '' : 's'}, ${formatBytes(data.total)}.`);
  const { ms, engineMs, waitMs, copiedBytes, memoryBytes } = data;
  job.run = { ms, engineMs, waitMs, copiedBytes, memoryBytes };
  setPhase('done');
}

async function failed(job, message) {
  if (state.job !== job) return;
  job.worker?.terminate();
  // Delete before telling the user: once the page says "failed", nothing partial is left.
  await clearJob();
  $('progress-box').hidden = true;
  say('Conversion failed.');
  showError(message);
  setPhase('failed');
}

async function cancel() {
  const job = state.job;
  if (!job || job.outputs) return;
  job.worker.terminate();
  say('Cancelling…');
  await clearJob();
  $('progress-box').hidden = true;
  say('Cancelled; partial files deleted.');
  setPhase('cancelled');
}

/** Takes `files` as the input (`summary` describes them; by default from their Files' names and sizes). */
function setFiles(files, summary) {
  if (document.body.dataset.state === 'converting') return;
  state.opens.files++; // a URL still opening is superseded
  state.files = files;
  $('input-summary').textContent = displaySafe(summary ?? describeFiles(files, formatBytes));
  rescan();
  replan();
}

/**
 * Opens a URL typed in the field (or given as `?url=`): a file, or a folder manifest fetched here (see
 * urlinput.js), whose entries the engine's worker then reads with Range requests. Meanwhile there is no input, so
 * nothing can be converted from the one before; a failure says why, naming the URL.
 */
async function openInputUrl(text) {
  if (document.body.dataset.state === 'converting') return;
  const n = ++state.opens.files;
  state.planWorker?.terminate();
  state.planWorker = null;
  state.scanWorker?.terminate();
  state.scanWorker = null;
  state.files = [];
  state.plan = null;
  hidePlan();
  $('scan-box').hidden = true;
  showError('');
  $('input-summary').textContent = 'Opening the URL…';
  $('plan-status').textContent = 'Opening the URL…';
  setPhase('planning');
  let opened;
  try {
    opened = await pending(openUrl(text));
  } catch (e) {
    if (state.opens.files !== n) return;
    $('input-summary').textContent = 'Nothing chosen yet.';
    $('plan-status').textContent = 'This URL cannot be opened.';
    showError(e.message);
    return setPhase('invalid');
  }
  if (state.opens.files !== n) return;
  setFiles(opened.inputs, describeUrlInput(opened, formatBytes));
}

/** Awaits a URL being opened, with Convert disabled meanwhile. */
async function pending(opening) {
  state.opens.pending++;
  setPhase(document.body.dataset.state);
  try {
    return await opening;
  } finally {
    state.opens.pending--;
    if (state.opens.pending === 0) setPhase(document.body.dataset.state);
  }
}

/** Opens the base model's manifest URL (typed, or `?base=`): the base is a folder, so a manifest it must be. */
async function openBaseUrl(text) {
  if (document.body.dataset.state === 'converting') return;
  const n = ++state.opens.base;
  $('base-summary').textContent = 'Opening the URL…';
  if (state.files.length) {
    // The plan will change with the base: none is shown meanwhile.
    state.planWorker?.terminate();
    state.planWorker = null;
    state.plan = null;
    hidePlan();
    showError('');
    $('plan-status').textContent = 'Opening the base model URL…';
    setPhase('planning');
  }
  let opened;
  try {
    opened = await pending(openUrl(text, { manifestOnly: true }));
  } catch (e) {
    if (state.opens.base !== n) return;
    state.planWorker?.terminate();
    state.planWorker = null;
    state.base = [];
    state.plan = null;
    $('base-summary').textContent = 'none';
    $('clear-base').hidden = true;
    hidePlan();
    $('plan-status').textContent = 'The base model URL cannot be opened.';
    showError(e.message);
    return setPhase('invalid');
  }
  if (state.opens.base !== n) return;
  setBase(opened.inputs, describeUrlInput(opened, formatBytes));
}

/** A pickle-based file chosen alone gets a safety scan beside its plan (shown also when the plan is refused). */
function rescan() {
  state.scanWorker?.terminate();
  state.scanWorker = null;
  $('scan-box').hidden = true;
  const [only] = state.files;
  if (state.files.length !== 1 || !/\.(pt|pth|bin|pkl|pickle|ckpt)$/i.test(only.path)) return;
  const worker = spawnWorker();
  state.scanWorker = worker;
  worker.onmessage = ({ data }) => {
    worker.terminate();
    if (state.scanWorker !== worker) return;
    state.scanWorker = null;
    if (data.type === 'scan') showScan(data.report);
  };
  worker.postMessage({ type: 'scan', file: only });
}

function showScan(report) {
  const bad = report.globals.filter((g) => g.dangerous);
  $('scan-verdict').textContent = report.dangerous
    ? `Dangerous: it names ${bad.length} global(s) off ckptconv's allowlist` +
      (report.unchecked.length ? `, and ${report.unchecked.length} part(s) could not be checked` : '') +
      '. torch.load(weights_only=False) would run them; do not load it with torch unless you trust its source.'
    : 'Clean: every global it names is on the allowlist (tensor rebuilds and data classes).';
  const refused = report.globals.filter((g) => !g.weights_only).map((g) => g.name);
  $('scan-weights-only').textContent = refused.length
    ? `torch.load(weights_only=True) would refuse it: ${refused.join(', ')}.`
    : 'torch.load(weights_only=True) would accept every global it names.';
  const body = $('scan-globals').tBodies[0];
  body.replaceChildren(
    ...report.globals.map((g) => {
      const row = document.createElement('tr');
      if (g.dangerous) row.className = 'danger';
      for (const text of [g.name, g.class + (g.call ? ` (${g.call})` : '')]) {
        const cell = document.createElement('td');
        cell.textContent = displaySafe(text);
        row.append(cell);
      }
      return row;
    }),
  );
  $('scan-box').dataset.dangerous = String(report.dangerous);
  $('scan-box').hidden = false;
}

/** Takes `files` as the base model folder (`summary` as in setFiles). */
function setBase(files, summary) {
  state.opens.base++;
  state.base = files;
  $('base-summary').textContent = files.length ? displaySafe(summary ?? describeFiles(files, formatBytes)) : 'none';
  $('clear-base').hidden = files.length === 0;
  if (state.files.length) replan();
}

async function exportToFolder() {
  const job = state.job;
  const fileOf = async (name) =>
    job.store === 'memory'
      ? job.memoryFiles.find((m) => m.name === name).blob
      : (await outputHandle(job.id, name)).getFile();
  try {
    const saved = await saveToFolder(job.outputs, fileOf, (i, o) =>
      say(`Saving ${displaySafe(o.name)} (${i + 1} of ${job.outputs.length})…`),
    );
    if (saved) say(`Saved ${job.outputs.length} file${job.outputs.length === 1 ? '' : 's'}.`);
  } catch (e) {
    showError(`saving failed: ${e.message}`);
  }
}

/**
 * Downloads every output as one .zip (folders kept in the names): the CRCs are summed in a worker, then the archive
 * is a Blob of small headers around the output Files themselves, so nothing is copied; made once per job.
 */
async function downloadZip() {
  const job = state.job;
  if (!job?.outputs) return;
  if (job.zip) {
    // Made already (or being made): the same archive again.
    if (job.zip.url) startDownload(job.zip.url, job.zipName);
    return;
  }
  const button = $('download-zip');
  button.disabled = true;
  showError('');
  const blobs = job.outputs.map((o) => job.blobs.get(o.name));
  const total = blobs.reduce((n, b) => n + b.size, 0);
  // Tenths only: the status is announced to screen readers.
  let tenth = -1;
  const progress = (done) => {
    const t = total > 0 ? Math.floor((done / total) * 10) : 10;
    if (t > tenth) say(`Preparing the .zip… ${(tenth = t) * 10}%`);
  };
  progress(0);
  const crcs = crcsInWorker(blobs, progress);
  job.zip = { abort: crcs.abort };
  try {
    const sums = await crcs.done;
    if (state.job !== job) return;
    const zip = zipBlob(job.outputs.map((o, i) => ({ name: o.name, blob: blobs[i], crc32: sums[i] })));
    const url = URL.createObjectURL(zip);
    job.urls.push(url);
    job.zip = { url };
    startDownload(url, job.zipName);
    say(`Downloading ${displaySafe(job.zipName)} (${job.outputs.length} files, ${formatBytes(zip.size)}).`);
  } catch (e) {
    if (state.job !== job) return;
    job.zip = null;
    say('');
    showError(`could not make the .zip: ${e.message}`);
  } finally {
    if (state.job === job) button.disabled = false;
  }
}

function startDownload(url, name) {
  const a = Object.assign(document.createElement('a'), { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

function wire() {
  const drop = $('drop');
  // The browser would open a file dropped anywhere else on the page.
  for (const type of ['dragover', 'drop']) window.addEventListener(type, (e) => e.preventDefault());
  drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    drop.classList.add('over');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    filesFromDrop(e.dataTransfer).then(setFiles, (err) => showError(`could not read the drop: ${err.message}`));
  });
  drop.addEventListener('click', () => $('files-input').click());
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      $('files-input').click();
    }
  });
  $('choose-files').onclick = () => $('files-input').click();
  $('choose-folder').onclick = () => $('folder-input').click();
  $('choose-base').onclick = () => $('base-input').click();
  $('clear-base').onclick = () => setBase([]);
  // Each input is emptied once read, so choosing the same file again still fires `change` (and re-plans).
  const take = (use) => (e) => {
    const files = filesFromInput(e.target.files);
    e.target.value = '';
    use(files);
  };
  $('files-input').onchange = take(setFiles);
  $('folder-input').onchange = take(setFiles);
  $('base-input').onchange = take(setBase);
  // Re-plan only when an option really changed: a blur fires `change` again for the same value.
  $('options').addEventListener('change', () => {
    if (state.files.length && planKey(readOptions()) !== state.requestedKey) replan();
  });
  $('options').addEventListener('submit', (e) => e.preventDefault());
  // Enter in a URL field submits its form, as the Open button does.
  $('url-form').addEventListener('submit', (e) => {
    e.preventDefault();
    openInputUrl($('url-input').value);
  });
  $('base-url-form').addEventListener('submit', (e) => {
    e.preventDefault();
    openBaseUrl($('base-url-input').value);
  });
  $('convert').onclick = convert;
  $('cancel').onclick = cancel;
  $('save-folder').onclick = exportToFolder;
  $('download-zip').onclick = downloadZip;
  $('clear-outputs').onclick = async () => {
    await clearJob();
    say('Deleted the outputs from browser storage.');
  };
  window.addEventListener('beforeunload', (e) => {
    if (document.body.dataset.state === 'converting') e.preventDefault();
  });
}

// For the browser tests: what is in OPFS, and the outputs' bytes.
window.ckptconvTest = {
  list: listAll,
  hash: sha256,
  job: () => state.job && { id: state.job.id, store: state.job.store, outputs: state.job.outputs, run: state.job.run },
  // Lets an engine held with ?hold=N go on.
  release: () => state.job?.worker?.postMessage({ type: 'release' }),
  async sha256(name) {
    const job = state.job;
    const m = job.memoryFiles.find((f) => f.name === name);
    return sha256(m ? m.blob : await (await outputHandle(job.id, name)).getFile());
  },
};

wire();
setPhase('idle');
// Folders of jobs no tab holds are leftovers (a closed tab, a crash): free their space.
sweepJobs().catch(() => {});
// `?base=` and `?url=` fill the URL fields and open them: the base first, so a Megatron folder plans once, with it.
if (query.get('base')) {
  $('base-url-input').value = query.get('base');
  await openBaseUrl(query.get('base'));
}
if (query.get('url')) {
  $('url-input').value = query.get('url');
  await openInputUrl(query.get('url'));
}
