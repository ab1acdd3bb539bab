// Types of the ckptconv npm package (hand-written; the wasm-bindgen types of the engine stay internal).

/** One input file with its path relative to the dropped folder (a shared top folder is stripped). */
export interface InputFile {
  path: string;
  file: Blob | BlobLike;
}

/** One input file behind an http(s) URL, read with HTTP Range requests (a hub's file listing is a list of them). */
export interface InputUrl {
  path: string;
  url: string | URL;
}

/** Anything with a size and slices that read as ArrayBuffers (huggingface.js's WebBlob, for one). */
export interface BlobLike {
  size: number;
  name?: string;
  slice(start: number, end: number): { arrayBuffer(): Promise<ArrayBuffer> };
}

/**
 * Inputs: a single File (a torch.save file), or the files of a folder: a FileList from
 * `<input type=file webkitdirectory>` (their `webkitRelativePath` is kept), an array of Files, `{path, file}` or
 * `{path, url}` entries; an http(s) URL (string or URL) of one file; a Blob-like; in Node also the path of a file
 * or folder. In a browser a Blob-like is read through shared memory, which needs a cross-origin-isolated page.
 */
export type Inputs =
  | Blob
  | BlobLike
  | URL
  | string
  | InputFile
  | InputUrl
  | FileList
  | ReadonlyArray<File | Blob | BlobLike | URL | string | InputFile | InputUrl>;

export interface Options {
  /** Output dtype for float tensors; `keep` (the default) writes them as saved. */
  dtype?: 'keep' | 'bf16' | 'fp16' | 'fp32';
  /** LoRA weights: merge them into the base weights (the default when present) or export a PEFT adapter. */
  lora?: 'merge' | 'adapter';
  loraAlpha?: number;
  loraR?: number;
  /** Shard the output, in HF's units: `5GB` is 5·10⁹ bytes, `5GiB` 5·2³⁰. Default: one file. */
  maxShardSize?: string;
  /** A dotted prefix to convert (`''` keeps every tensor with its full path). Default: found automatically. */
  prefix?: string;
  /** Accept names or shapes that differ from the base model's. */
  allowMismatch?: boolean;
  /** Convert one shard of a sharded Hugging Face set alone (normally every shard of the set is required). */
  allowPartial?: boolean;
  /**
   * `module.name` of globals the checkpoint's pickles may call beyond ckptconv's allowlist of data (as the CLI's
   * `--allow-global`, torch's `add_safe_globals`): only for a file you trust. ckptconv still calls nothing.
   */
  allowGlobals?: string[];
  /** A Hugging Face model folder (config.json, tokenizer…): names, config and files to package with the output. */
  base?: Inputs;
  /**
   * `convert` (the default): Hugging Face output. `dcp-to-pt`: the checkpoint's tensors as saved, in one torch.save
   * file named `outputName` (default `full_weights.pt`), as `ckptconv dcp-to-pt` and RLinf's convert_dcp_to_pt.py.
   */
  mode?: 'convert' | 'dcp-to-pt';
  /** In `convert` mode: `safetensors` (the default) or `pt` (one `pytorch_model.bin`, as `--format pt`). */
  format?: 'safetensors' | 'pt';
  /** The torch.save file's name in `dcp-to-pt` mode. */
  outputName?: string;
  /** Stops the conversion (the worker ends, requests are aborted, open streams error). */
  signal?: AbortSignal;
}

export interface PlannedTensor {
  name: string;
  /** safetensors dtype name: F32, BF16, F16, I64, … */
  dtype: string;
  shape: number[];
  bytes: number;
}

export interface Plan {
  /** The detected input format, e.g. "torch.save zip (archive 'full_weights/')". */
  format: string;
  /** What the engine found or decided: the Megatron TP × PP grid, which file of a folder it used, … */
  notes: string[];
  /** Groups of the checkpoint (model, optimizer state, …) with their tensor counts and sizes. */
  groups: { name: string; tensors: number; bytes: number; others: number }[];
  tensors: PlannedTensor[];
  /** Sum of the planned tensors' bytes. */
  totalBytes: number;
  /** Every file the conversion writes, in the order they are produced; sizes are exact. */
  outputs: { name: string; size: number }[];
}

export interface OutputFile {
  /** Relative path of the file; may contain `/` (e.g. `lora_adapter/adapter_model.safetensors`). */
  name: string;
  size: number;
  /**
   * The file's bytes, pulled from the worker one chunk at a time. Call it once per file, in order; each stream
   * starts producing once the previous one has ended. Cancelling a stream stops the whole conversion.
   */
  stream(): ReadableStream<Uint8Array>;
}

export interface Conversion {
  plan: Plan;
  files: OutputFile[];
  /** Peak wasm memory of the engine so far, in bytes. */
  memoryBytes(): Promise<number>;
  /** Bytes received from URLs so far (read on the calling thread; a browser worker's own URL reads not counted). */
  fetchedBytes(): number;
  /** Stops the worker; streams still open error. */
  terminate(): void;
}

/** One global a scanned file's pickles name. */
export interface ScannedGlobal {
  /** `module.name`, Python 3 spelling. */
  name: string;
  class: 'tensor rebuild' | 'allowed data class' | 'not allowlisted' | 'not allowlisted, known code-executing';
  dangerous: boolean;
  /** How a refused call would have used it ("called by REDUCE", ...), if the reader saw one. */
  call: string | null;
  /** Byte offset of its first use in its pickle. */
  offset: number;
  /** Whether torch.load(weights_only=True) accepts it. */
  weights_only: boolean;
}

/** What scan() found: the JSON of `ckptconv scan --json`. */
export interface ScanReport {
  file: string;
  container: string | null;
  globals: ScannedGlobal[];
  weights_only: boolean;
  converts: boolean;
  convert_error: string | null;
  tensors: { name: string; dtype: string; shape: number[] }[];
  /** Parts that could not be read (so the file is not called clean). */
  unchecked: string[];
  dangerous: boolean;
}

/** A safety report of one pickle-based file, executing nothing. Rejects when the file cannot be read at all. */
export function scan(file: Inputs, options?: { signal?: AbortSignal }): Promise<ScanReport>;

/** Plans a conversion without writing anything. Rejects with the engine's message (naming the file) on bad input. */
export function inspect(files: Inputs, options?: Options): Promise<Plan>;

/** Plans a conversion and returns its output files, to be streamed in order. */
export function convert(files: Inputs, options?: Options): Promise<Conversion>;

/**
 * Node: converts into the folder `dir` atomically: every file is written under a hidden `.NAME.partial` name and
 * renamed only after the last byte of the last one; on failure or abort the partial files are deleted. Existing
 * files are replaced only with `overwrite: true`. Resolves to the plan.
 */
export function convertToFolder(files: Inputs, dir: string, options?: Options & { overwrite?: boolean }): Promise<Plan>;

/** The normalized input list for `files`, as inspect() and convert() build it. */
export function toInputs(
  files: Inputs | null | undefined,
): ({ path: string; file: Blob } | { path: string; url: string } | { path: string; blobLike: BlobLike } | { local: string | URL })[];
