// Turns what the user hands over (a drop of files or folders, a file input, a folder input) into the engine's
// input list: [{path, file}] with relative paths kept, so a dropped `global_step_50/` reads as that folder.

/**
 * The files of a drop. Call it synchronously inside the drop handler: the DataTransfer's items are emptied once
 * the handler returns, so entries and files are taken first and the folders walked afterwards.
 */
export function filesFromDrop(dataTransfer) {
  const taken = [];
  for (const item of dataTransfer.items ?? []) {
    if (item.kind !== 'file') continue;
    // A synthetic or non-filesystem drop has no entry: fall back to the plain File.
    taken.push({ entry: item.webkitGetAsEntry?.() ?? null, file: item.getAsFile() });
  }
  if (taken.length === 0) {
    for (const file of dataTransfer.files ?? []) taken.push({ entry: null, file });
  }
  return (async () => {
    const out = [];
    for (const { entry, file } of taken) {
      if (entry) await walkEntry(entry, out);
      else if (file) out.push({ path: file.name, file });
    }
    return out;
  })();
}

/** Appends every file under `entry` (a FileSystemEntry) to `out`, with its path relative to the drop. */
export async function walkEntry(entry, out) {
  if (entry.isFile) {
    const file = await new Promise((ok, fail) => entry.file(ok, fail));
    out.push({ path: entry.fullPath.replace(/^\/+/, ''), file });
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    // readEntries returns at most ~100 entries a call (Chromium): keep calling until a batch comes back empty.
    for (;;) {
      const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
      if (batch.length === 0) break;
      for (const child of batch) await walkEntry(child, out);
    }
  }
  return out;
}

/** The files of an `<input type=file>` (with or without webkitdirectory): the folder input sets webkitRelativePath. */
export function filesFromInput(fileList) {
  return [...fileList].map((file) => ({ path: file.webkitRelativePath || file.name, file }));
}

/** "3 files, 1.2 GB in qwen2/" — for the page's summary line. */
export function describeFiles(files, formatBytes) {
  if (files.length === 0) return 'nothing chosen';
  const total = files.reduce((n, f) => n + f.file.size, 0);
  const tops = new Set(files.map((f) => (f.path.includes('/') ? f.path.split('/')[0] : '')));
  const where = tops.size === 1 && !tops.has('') ? ` in ${[...tops][0]}/` : '';
  if (files.length === 1) return `${files[0].path} (${formatBytes(total)})`;
  return `${files.length} files, ${formatBytes(total)}${where}`;
}
