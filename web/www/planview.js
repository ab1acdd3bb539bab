// Renders the engine's plan (format, notes, groups, planned tensors with totals) and the list of finished outputs.
// Everything goes in through textContent: tensor names come from the checkpoint and are never treated as HTML;
// and every string from it through displaySafe, so control and bidi characters show as escapes.
import { displaySafe, formatBytes, formatShape } from './format.js';

const $ = (id) => document.getElementById(id);

function cell(row, text, tag = 'td', cls = '') {
  const c = document.createElement(tag);
  c.textContent = text;
  if (cls) c.className = cls;
  row.append(c);
  return c;
}

export function showPlan(plan) {
  $('plan').hidden = false;
  $('plan-format').textContent = displaySafe(plan.format);
  const outs = plan.outputs;
  const outBytes = outs.reduce((n, o) => n + o.size, 0);
  $('plan-outputs').textContent =
    `${outs.length} file${outs.length === 1 ? '' : 's'}, ${formatBytes(outBytes)}: ` +
    outs.map((o) => displaySafe(o.name)).join(', ');

  const notes = $('plan-notes');
  notes.replaceChildren(...plan.notes.map((n) => Object.assign(document.createElement('li'), { textContent: displaySafe(n) })));

  const groups = $('plan-groups');
  groups.hidden = plan.groups.length === 0;
  groups.tBodies[0].replaceChildren(
    ...plan.groups.map((g) => {
      const tr = document.createElement('tr');
      cell(tr, displaySafe(g.name), 'th').scope = 'row';
      cell(tr, String(g.tensors), 'td', 'num');
      cell(tr, formatBytes(g.bytes), 'td', 'num');
      cell(tr, String(g.others), 'td', 'num');
      return tr;
    }),
  );

  // A DocumentFragment keeps a few thousand rows to one layout.
  const rows = document.createDocumentFragment();
  for (const t of plan.tensors) {
    const tr = document.createElement('tr');
    cell(tr, displaySafe(t.name), 'th').scope = 'row';
    cell(tr, t.dtype);
    cell(tr, formatShape(t.shape));
    cell(tr, formatBytes(t.bytes), 'td', 'num').title = `${t.bytes} bytes`;
    rows.append(tr);
  }
  $('plan-tensors').tBodies[0].replaceChildren(rows);
  const n = plan.tensors.length;
  $('tensors-summary').textContent = `Planned tensors (${n})`;
  $('tensors-count').textContent = `${n} tensor${n === 1 ? '' : 's'}`;
  $('tensors-total').textContent = formatBytes(plan.totalBytes);
  $('tensors-total').title = `${plan.totalBytes} bytes`;
  // Very long lists start folded, so the page stays usable.
  $('tensors-box').open = n <= 400;
}

export function hidePlan() {
  $('plan').hidden = true;
}

/** Download links for finished outputs: `files` is [{name, size, url}]. */
export function showOutputs(files) {
  $('outputs').replaceChildren(
    ...files.map((f) => {
      const li = document.createElement('li');
      const a = document.createElement('a');
      a.href = f.url;
      // Browsers refuse '/' in download names: keep the folder in the name instead.
      a.download = f.name.replaceAll('/', '_');
      a.textContent = displaySafe(f.name);
      li.append(a, ` ${formatBytes(f.size)}`);
      return li;
    }),
  );
}
