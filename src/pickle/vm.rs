//! The pickle virtual machine: protocols 0 to 5, limits on everything a hostile stream can grow.

use super::policy::{self, Role};
use super::{Heap, Id, Node, TensorNode};
use crate::error::{Error, ErrorKind, GlobalUse, Result};
use crate::io::{AllowedGlobals, ByteCursor};
use std::collections::{HashMap, HashSet};

/// Caps on what one pickle may build. Defaults fit real checkpoints with wide margins.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most nodes in the heap.
    pub max_nodes: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Most open `MARK`s at once (nesting of tuples/lists/dicts being built).
    pub max_marks: usize,
    /// Most values on the stack.
    pub max_stack: usize,
    /// Most bytes in strings and byte strings together.
    pub max_payload: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 4_000_000,
            max_memo: 4_000_000,
            max_marks: 10_000,
            max_stack: 1_000_000,
            max_payload: 256 << 20,
        }
    }
}

struct Vm<'c, 'a> {
    cur: &'c mut ByteCursor<'a>,
    heap: Heap,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: Memo,
    /// The one node of each immutable constant pushed so far (None, bools, ints up to 65535, the empty tuple),
    /// as Python shares them: a DCP `.metadata` of 100,000 entries pushes 1.3 million of them.
    consts: HashMap<Const, Id>,
    limits: Limits,
    op_offset: u64,
    /// Absolute end of the `FRAME` the cursor is inside, if any (see [`Vm::frame_step`]).
    frame_end: Option<u64>,
    /// The first place where Python's unpicklers could read the stream otherwise (a frame that disagrees with its
    /// opcodes). The parse fails with it, after reading on as `_pickle.c` reads a buffer, so that the calls further
    /// on are still named (a refusal outranks it).
    differential: Option<Error>,
    /// Globals the user allows beyond the allowlist (the input's `--allow-global`s).
    allowed: AllowedGlobals,
    /// Every global named, kept only when the input asks for a log (`scan`).
    all: Option<Uses>,
    /// Calls of globals off the allowlist: recorded, never made; the parse fails with all of them at the end.
    refused: Uses,
    /// Globals off the allowlist that the pickle names (called or not).
    named: Uses,
}

/// How a pickle calls a global.
#[derive(Clone, Copy)]
enum Call {
    Reduce,
    NewObj,
    NewObjEx,
    Inst,
    Obj,
    /// The function `_rebuild_from_type_v2` calls.
    FromType,
}

impl Call {
    fn text(self) -> &'static str {
        match self {
            Call::Reduce => "called by REDUCE",
            Call::NewObj => "instantiated by NEWOBJ",
            Call::NewObjEx => "instantiated by NEWOBJ_EX",
            Call::Inst => "instantiated by INST",
            Call::Obj => "instantiated by OBJ",
            Call::FromType => "function called by _rebuild_from_type_v2",
        }
    }

    /// The text for a class that may be rebuilt with `__new__` but is called in a way that runs its `__init__`.
    fn runs_init(self) -> &'static str {
        match self {
            Call::Reduce => "called by REDUCE, which runs its __init__; only NEWOBJ rebuilds it as data",
            Call::Inst => "instantiated by INST, which runs its __init__; only NEWOBJ rebuilds it as data",
            Call::Obj => "instantiated by OBJ, which runs its __init__; only NEWOBJ rebuilds it as data",
            other => other.text(),
        }
    }

    /// NEWOBJ and NEWOBJ_EX build with `cls.__new__(cls, *args)` and never run `__init__`.
    fn only_new(self) -> bool {
        matches!(self, Call::NewObj | Call::NewObjEx)
    }
}

/// Most distinct globals a scan lists (a pickle naming more is hostile; the first ones say enough).
const MAX_LOGGED_GLOBALS: usize = 10_000;

/// Distinct globals and where each is first used.
#[derive(Default)]
struct Uses {
    list: Vec<GlobalUse>,
    seen: HashSet<String>,
}

impl Uses {
    fn add(&mut self, global: String, offset: u64, how: &str) {
        if !self.seen.contains(&global) {
            self.seen.insert(global.clone());
            self.list.push(GlobalUse { global, offset, how: how.to_string() });
        }
    }
}

/// Runs one pickle from the cursor's position to its `STOP`, returning the heap and the root node.
pub fn parse(cur: &mut ByteCursor<'_>, limits: Limits) -> Result<(Heap, Id)> {
    let name = cur.input().name.clone();
    let allowed = cur.input().allowed_globals.clone();
    let log = cur.input().global_log.clone();
    let mut vm = Vm {
        cur,
        heap: Heap::default(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Memo::default(),
        consts: HashMap::new(),
        limits,
        op_offset: 0,
        frame_end: None,
        differential: None,
        allowed,
        all: log.as_ref().map(|_| Uses::default()),
        refused: Uses::default(),
        named: Uses::default(),
    };
    let run = vm.run();
    if let (Some(log), Some(all)) = (&log, vm.all.take()) {
        // A poisoned lock only means another thread panicked mid-push: the list is still a list.
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        let known: HashSet<String> = log.iter().map(|(g, _)| g.clone()).collect();
        let room = MAX_LOGGED_GLOBALS.saturating_sub(log.len());
        log.extend(
            all.list.into_iter().filter(|u| !known.contains(&u.global)).take(room).map(|u| (u.global, u.offset)),
        );
    }
    // The first differential is the first thing wrong with the stream, whatever came after it.
    let run = match vm.differential.take() {
        Some(d) => Err(d),
        None => run,
    };
    // A refused call outranks whatever else is wrong with the stream: it says what the file is.
    if !vm.refused.list.is_empty() {
        let refused = &vm.refused.seen;
        let named = vm.named.list.into_iter().filter(|u| !refused.contains(&u.global)).collect();
        return Err(Error::new(ErrorKind::UnsafeGlobal { calls: vm.refused.list, named }).in_file(&name));
    }
    let root = match run {
        Ok(root) => root,
        // A stream that breaks off still says what it names: a reviewer wants to know a broken file names
        // `builtins.exec`, though no reader gets as far as calling it.
        Err(e) if !vm.named.list.is_empty() => {
            let listed: Vec<String> = vm.named.list.iter().take(8).map(|u| u.global.clone()).collect();
            let more = vm.named.list.len().saturating_sub(listed.len());
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            let text = format!("; before that, it names {}{more}, off ckptconv's allowlist", listed.join(", "));
            return Err(e.with_more(&text).in_file(&name));
        }
        Err(e) => return Err(e.in_file(&name)),
    };
    vm.heap.named_globals = vm.named.list;
    Ok((vm.heap, root))
}

/// Runs one pickle that must fill the cursor's whole range (a torch zip's `data.pkl`, a DCP `.metadata`, a
/// whole file): see [`ensure_consumed`].
pub fn parse_all(cur: &mut ByteCursor<'_>, limits: Limits) -> Result<(Heap, Id)> {
    let parsed = parse(cur, limits)?;
    ensure_consumed(cur)?;
    Ok(parsed)
}

/// After [`parse`], refuses bytes left after the pickle's `STOP` in the cursor's range: Python stops reading at
/// `STOP`, so they would be data that no reader checks (a second format appended to the pickle, a polyglot).
/// Only for pickles that must fill their range: the legacy torch format is several pickles and raw bytes in a row.
pub fn ensure_consumed(cur: &ByteCursor<'_>) -> Result<()> {
    let left = cur.remaining();
    if left == 0 {
        return Ok(());
    }
    let stop = cur.pos().saturating_sub(1);
    Err(Error::new(ErrorKind::Pickle {
        offset: cur.pos(),
        msg: format!(
            "{left} bytes after the pickle's STOP at byte {stop}; Python stops reading at STOP, so no reader would \
             check them"
        ),
    })
    .in_file(&cur.input().name))
}

impl Vm<'_, '_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::new(ErrorKind::Pickle { offset: self.op_offset, msg: msg.into() })
    }

    fn limit(&self, msg: String) -> Error {
        Error::new(ErrorKind::Limit(format!("{msg} (pickle byte {})", self.op_offset)))
    }

    fn alloc(&mut self, node: Node) -> Result<Id> {
        if self.heap.nodes.len() >= self.limits.max_nodes {
            return Err(self.limit(format!("more than {} pickle objects", self.limits.max_nodes)));
        }
        let payload = match &node {
            Node::Str(s) => s.len() as u64,
            Node::Bytes(b) | Node::BigInt(b) => b.len() as u64,
            _ => 0,
        };
        self.heap.payload_bytes = self.heap.payload_bytes.saturating_add(payload);
        if self.heap.payload_bytes > self.limits.max_payload {
            return Err(self.limit(format!("more than {} bytes of pickled strings", self.limits.max_payload)));
        }
        self.heap.nodes.push(node);
        Ok((self.heap.nodes.len() - 1) as Id)
    }

    fn push(&mut self, id: Id) -> Result<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(self.limit(format!("pickle stack deeper than {}", self.limits.max_stack)));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push_new(&mut self, node: Node) -> Result<()> {
        let id = self.alloc(node)?;
        self.push(id)
    }

    /// Pushes an immutable constant, sharing one node per value (nothing mutates these nodes).
    fn push_const(&mut self, c: Const) -> Result<()> {
        let id = match self.consts.get(&c) {
            Some(&id) => id,
            None => {
                let id = self.alloc(match c {
                    Const::None => Node::None,
                    Const::Bool(b) => Node::Bool(b),
                    Const::Int(i) => Node::Int(i),
                    Const::EmptyTuple => Node::Tuple(Vec::new()),
                })?;
                self.consts.insert(c, id);
                id
            }
        };
        self.push(id)
    }

    /// Pushes an int from BININT/BININT1/BININT2: shared when small.
    fn push_int(&mut self, v: i64) -> Result<()> {
        if v.unsigned_abs() <= 65535 { self.push_const(Const::Int(v)) } else { self.push_new(Node::Int(v)) }
    }

    fn pop(&mut self) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.last().copied().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let mark = self.marks.pop().ok_or_else(|| self.err("no MARK on the stack"))?;
        if mark > self.stack.len() {
            return Err(self.err("MARK beyond the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, key: u32, id: Id) -> Result<()> {
        if self.memo.len >= self.limits.max_memo && self.memo.get(key).is_none() {
            return Err(self.limit(format!("memo larger than {} entries", self.limits.max_memo)));
        }
        self.memo.put(key, id);
        Ok(())
    }

    fn memo_get(&self, key: u32) -> Result<Id> {
        self.memo.get(key).ok_or_else(|| self.err(format!("memo key {key} was never stored")))
    }

    fn u16le(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.cur.array()?))
    }
    fn u32le(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.cur.array()?))
    }
    fn u64le(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.cur.array()?))
    }

    /// Frame bookkeeping before each opcode. Python reads a frame's opcodes from the frame alone (`pickle.py`'s
    /// `_Unframer`) or reads straight on and trusts the frame's size (`_pickle.c`, whose file reads also drop the
    /// rest of a frame when an opcode runs past it), so every way a frame's size can disagree with the opcodes in
    /// it is refused; then all three readings are the same as reading on. Opcodes outside any frame (pickle writes
    /// large byte strings unframed) are read as usual.
    fn frame_step(&mut self) {
        if self.frame_end.is_some_and(|end| self.cur.pos() >= end) {
            self.frame_end = None;
        }
    }

    /// After an opcode: one that began inside a frame must end inside it, its arguments and text lines too.
    fn frame_check(&self) -> Result<()> {
        match self.frame_end {
            Some(end) if self.cur.pos() > end => Err(self.err(format!(
                "the opcode runs past the end of its frame at byte {end} (to byte {}); Python's unpicklers read \
                 such an opcode differently",
                self.cur.pos()
            ))),
            _ => Ok(()),
        }
    }

    /// FRAME: its size must fit in what is left of the pickle (else the stream ends here, truncated), and it may
    /// not begin inside another frame (a differential; the new frame is read on).
    fn frame_open(&mut self) -> Result<()> {
        if let Some(end) = self.frame_end {
            let e = self.err(format!(
                "a FRAME begins inside the frame that runs to byte {end}; Python reads the rest of that frame \
                 differently (\"beginning of a new frame before end of current frame\")"
            ));
            self.differential.get_or_insert(e);
        }
        let size = self.u64le()?;
        let left = self.cur.remaining();
        if size > left {
            // As _pickle.c says ("pickle data was truncated"); pickle.py would read the short frame and go on.
            return Err(Error::new(ErrorKind::Truncated(format!(
                "a FRAME of {size} bytes at pickle byte {}, but only {left} bytes of the pickle follow it (cut \
                 short, or the frame's size lies)",
                self.op_offset
            ))));
        }
        self.frame_end = Some(self.cur.pos() + size);
        Ok(())
    }

    /// STOP inside a frame must be the frame's last byte: Python leaves the rest of the frame unread (or, reading
    /// a file, skips it, so the next pickle in the file would start elsewhere than here).
    fn frame_stop(&self) -> Result<()> {
        match self.frame_end {
            Some(end) if self.cur.pos() < end => Err(self.err(format!(
                "STOP inside a frame that runs {} bytes further, to byte {end}; Python would not read them as this \
                 pickle",
                end - self.cur.pos()
            ))),
            _ => Ok(()),
        }
    }

    fn text_line(&mut self) -> Result<String> {
        let line = self.cur.line(1 << 20)?;
        String::from_utf8(line).map_err(|_| self.err("text opcode argument is not UTF-8"))
    }

    fn utf8(&self, bytes: Vec<u8>) -> Result<String> {
        String::from_utf8(bytes).map_err(|_| self.err("string is not valid UTF-8"))
    }

    /// The VM's loop. Long by design: one match arm per opcode, as in CPython's `load` loop, so every opcode's
    /// stack effect reads in one place against the protocol's table.
    fn run(&mut self) -> Result<Id> {
        loop {
            if let Err(e) = self.frame_check() {
                self.differential.get_or_insert(e);
            }
            self.frame_step();
            self.op_offset = self.cur.pos();
            let op = self.cur.u8()?;
            match op {
                b'.' => {
                    if let Err(e) = self.frame_stop() {
                        self.differential.get_or_insert(e);
                    }
                    let root = self.pop()?;
                    return Ok(root);
                }
                0x80 => {
                    let proto = self.cur.u8()?;
                    if proto > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {proto}")));
                    }
                }
                0x95 => self.frame_open()?,
                b'(' => {
                    if self.marks.len() >= self.limits.max_marks {
                        return Err(self.limit(format!("nesting depth over {} MARKs", self.limits.max_marks)));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.push(t)?;
                }
                b'N' => self.push_const(Const::None)?,
                0x88 => self.push_const(Const::Bool(true))?,
                0x89 => self.push_const(Const::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.cur.array()?);
                    self.push_int(v as i64)?
                }
                b'K' => {
                    let v = self.cur.u8()?;
                    self.push_int(v as i64)?
                }
                b'M' => {
                    let v = self.u16le()?;
                    self.push_int(v as i64)?
                }
                b'I' => {
                    let s = self.text_line()?;
                    let node = match s.as_str() {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => self.parse_decimal(&s)?,
                    };
                    self.push_new(node)?
                }
                b'L' => {
                    let s = self.text_line()?;
                    let node = self.parse_decimal(s.trim_end_matches('L'))?;
                    self.push_new(node)?
                }
                0x8a => {
                    let n = self.cur.u8()? as u64;
                    let b = self.cur.bytes(n)?;
                    self.push_new(long_node(b))?
                }
                0x8b => {
                    let n = self.u32le()? as u64;
                    let b = self.cur.bytes(n)?;
                    self.push_new(long_node(b))?
                }
                b'F' => {
                    let s = self.text_line()?;
                    let v: f64 = s.trim().parse().map_err(|_| self.err(format!("bad float {s:?}")))?;
                    self.push_new(Node::Float(v))?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.cur.array()?);
                    self.push_new(Node::Float(v))?
                }
                b'X' => {
                    let n = self.u32le()? as u64;
                    let b = self.cur.bytes(n)?;
                    let s = self.utf8(b)?;
                    self.push_new(Node::Str(s))?
                }
                0x8c => {
                    let n = self.cur.u8()? as u64;
                    let b = self.cur.bytes(n)?;
                    let s = self.utf8(b)?;
                    self.push_new(Node::Str(s))?
                }
                0x8d => {
                    let n = self.u64le()?;
                    let b = self.cur.bytes(n)?;
                    let s = self.utf8(b)?;
                    self.push_new(Node::Str(s))?
                }
                b'V' => {
                    let line = self.cur.line(1 << 20)?;
                    let s = unescape_raw_unicode(&line).ok_or_else(|| self.err("bad UNICODE escape"))?;
                    self.push_new(Node::Str(s))?
                }
                b'S' => {
                    let line = self.cur.line(1 << 20)?;
                    let b = unquote_string(&line).ok_or_else(|| self.err("bad STRING literal"))?;
                    // Python 2 str: keep text when it is text, bytes otherwise.
                    let node = match String::from_utf8(b) {
                        Ok(s) => Node::Str(s),
                        Err(e) => Node::Bytes(e.into_bytes()),
                    };
                    self.push_new(node)?
                }
                b'T' => {
                    let n = self.u32le()? as u64;
                    let b = self.cur.bytes(n)?;
                    self.push_new(Node::Bytes(b))?
                }
                b'U' => {
                    let n = self.cur.u8()? as u64;
                    let b = self.cur.bytes(n)?;
                    self.push_new(Node::Bytes(b))?
                }
                b'B' => {
                    let n = self.u32le()? as u64;
                    let b = self.cur.bytes(n)?;
                    self.push_new(Node::Bytes(b))?
                }
                b'C' => {
                    let n = self.cur.u8()? as u64;
                    let b = self.cur.bytes(n)?;
                    self.push_new(Node::Bytes(b))?
                }
                0x8e | 0x96 => {
                    let n = self.u64le()?;
                    let b = self.cur.bytes(n)?;
                    self.push_new(Node::Bytes(b))?
                }
                0x97 | 0x98 => {
                    return Err(Error::new(ErrorKind::Unsupported(format!(
                        "out-of-band pickle buffers (pickle byte {})",
                        self.op_offset
                    ))));
                }
                b')' => self.push_const(Const::EmptyTuple)?,
                b']' => self.push_new(Node::List(Vec::new()))?,
                b'}' => self.push_new(Node::Dict(Vec::new()))?,
                0x8f => self.push_new(Node::Set(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_new(Node::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_new(Node::Tuple(items))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_new(Node::List(items))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let id = self.alloc(Node::Dict(Vec::new()))?;
                    self.set_items(id, pairs)?;
                    self.push(id)?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_new(Node::Set(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.append(target, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append(target, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    let target = self.top()?;
                    self.set_items(target, pairs)?
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match &mut self.heap.nodes[target as usize] {
                        Node::Set(v) => v.extend(items),
                        _ => return Err(self.err("ADDITEMS on a value that is not a set")),
                    }
                }
                b'g' => {
                    let s = self.text_line()?;
                    let key = s.trim().parse::<u32>().map_err(|_| self.err(format!("bad GET key {s:?}")))?;
                    let id = self.memo_get(key)?;
                    self.push(id)?
                }
                b'h' => {
                    let key = self.cur.u8()? as u32;
                    let id = self.memo_get(key)?;
                    self.push(id)?
                }
                b'j' => {
                    let key = self.u32le()?;
                    let id = self.memo_get(key)?;
                    self.push(id)?
                }
                b'p' => {
                    let s = self.text_line()?;
                    let key = s.trim().parse::<u32>().map_err(|_| self.err(format!("bad PUT key {s:?}")))?;
                    let t = self.top()?;
                    self.memo_put(key, t)?
                }
                b'q' => {
                    let key = self.cur.u8()? as u32;
                    let t = self.top()?;
                    self.memo_put(key, t)?
                }
                b'r' => {
                    let key = self.u32le()?;
                    let t = self.top()?;
                    self.memo_put(key, t)?
                }
                0x94 => {
                    let key = u32::try_from(self.memo.len).map_err(|_| self.err("memo too large"))?;
                    let t = self.top()?;
                    self.memo_put(key, t)?
                }
                b'c' => {
                    let module = self.text_line()?;
                    let name = self.text_line()?;
                    self.note_global(&module, &name);
                    self.push_new(Node::Global { module, name })?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(m), Some(n)) = (self.heap.as_str(module), self.heap.as_str(name)) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let (module, name) = (m.to_string(), n.to_string());
                    self.note_global(&module, &name);
                    self.push_new(Node::Global { module, name })?
                }
                0x82..=0x84 => {
                    return Err(Error::new(ErrorKind::Unsupported(format!(
                        "pickle extension registry codes (EXT opcodes, pickle byte {})",
                        self.op_offset
                    ))));
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let id = self.call(callable, args, Call::Reduce, 0)?;
                    self.push(id)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let id = self.call(cls, args, Call::NewObj, 0)?;
                    self.push(id)?
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let id = self.call(cls, args, Call::NewObjEx, 0)?;
                    self.push(id)?
                }
                b'i' => {
                    let module = self.text_line()?;
                    let name = self.text_line()?;
                    self.note_global(&module, &name);
                    let items = self.pop_mark()?;
                    let cls = self.alloc(Node::Global { module, name })?;
                    let args = self.alloc(Node::Tuple(items))?;
                    let id = self.call(cls, args, Call::Inst, 0)?;
                    self.push(id)?
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.err("OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let args = self.alloc(Node::Tuple(items))?;
                    let id = self.call(cls, args, Call::Obj, 0)?;
                    self.push(id)?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    match &mut self.heap.nodes[target as usize] {
                        Node::Object { state: s, .. } => *s = Some(state),
                        // State on a class, function or module object rebinds what it holds: a call in disguise.
                        Node::Global { module, name } if !policy::user_allows(module, name, &self.allowed) => {
                            self.refuse(target, "its attributes set by BUILD")
                        }
                        // BUILD on dicts (torch's `_metadata`) and tensors sets attributes we do not need.
                        _ => {}
                    }
                }
                b'P' => {
                    let s = self.text_line()?;
                    let pid = self.alloc(Node::Str(s))?;
                    self.push_new(Node::PersistentId(pid))?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.check_storage_type(pid);
                    self.push_new(Node::PersistentId(pid))?
                }
                other => return Err(self.err(format!("unknown opcode 0x{other:02x}"))),
            }
        }
    }

    fn parse_decimal(&self, s: &str) -> Result<Node> {
        let t = s.trim();
        if let Ok(v) = t.parse::<i64>() {
            return Ok(Node::Int(v));
        }
        if !t.is_empty() && t.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) {
            // Too big for i64: keep its text; no checkpoint field needs such a value.
            return Ok(Node::BigInt(t.as_bytes().to_vec()));
        }
        Err(self.err(format!("bad integer {s:?}")))
    }

    fn pairs(&self, items: Vec<Id>) -> Result<Vec<(Id, Id)>> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for a dict"));
        }
        Ok(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
    }

    fn append(&mut self, target: Id, items: Vec<Id>) -> Result<()> {
        match &mut self.heap.nodes[target as usize] {
            Node::List(v) => v.extend(items),
            Node::Object { list, .. } => list.extend(items),
            _ => return Err(self.err("APPEND to a value that is not a list")),
        }
        Ok(())
    }

    fn set_items(&mut self, target: Id, pairs: Vec<(Id, Id)>) -> Result<()> {
        for (k, v) in pairs {
            match self.heap.nodes.get(target as usize) {
                Some(Node::Dict(_)) => self.dict_set(target, k, v)?,
                Some(Node::Object { .. }) => {
                    if let Some(Node::Object { items, .. }) = self.heap.nodes.get_mut(target as usize) {
                        items.push((k, v));
                    }
                }
                _ => return Err(self.err("SETITEM on a value that is not a dict")),
            }
        }
        Ok(())
    }

    fn dict_set(&mut self, dict: Id, k: Id, v: Id) -> Result<()> {
        if let Node::Dict(items) = self.heap.get(dict)
            && u32::try_from(items.len()).is_err()
        {
            return Err(self.limit("a dict of more than 2^32 items".into()));
        }
        self.heap.dict_set(dict, k, v).ok_or_else(|| self.err("SETITEM on a value that is not a dict"))
    }

    /// REDUCE / NEWOBJ / INST / OBJ: builds data for known callables, inert objects for the rest. Long by design:
    /// one arm per callable it knows, each checking its own arguments.
    fn call(&mut self, callable: Id, args: Id, how: Call, depth: u32) -> Result<Id> {
        let (module, name) = match self.heap.get(callable) {
            Node::Global { module, name } => (module.clone(), name.clone()),
            _ => {
                // Calling a value the pickle built (the result of another call, a string, ...): never data.
                self.refuse(callable, how.text());
                return self.err_object(callable, args);
            }
        };
        let allowed = if how.only_new() { self.instantiable(callable) } else { self.callable(callable) };
        if !allowed {
            // Recorded, never made: the parse goes on to name every such call, then fails.
            let text = if self.instantiable(callable) { how.runs_init() } else { how.text() };
            self.refuse(callable, text);
            return self.err_object(callable, args);
        }
        let argv: Vec<Id> = match self.heap.get(args) {
            Node::Tuple(v) | Node::List(v) => v.clone(),
            _ => return Err(self.err(format!("arguments of {module}.{name} are not a tuple"))),
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor" | "_rebuild_tensor_v3") => {
                self.rebuild_tensor(&name, &argv)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                let t = *argv.first().ok_or_else(|| self.err("_rebuild_parameter without a tensor"))?;
                if let Some(&hooks) = argv.get(2) {
                    self.check_hooks(hooks);
                }
                Ok(t)
            }
            ("torch._utils", "_rebuild_wrapper_subclass") => {
                if let Some(&cls) = argv.first() {
                    self.check_role(cls, Role::TensorType, "class given to _rebuild_wrapper_subclass");
                }
                self.err_object(callable, args)
            }
            ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
                // numpy builds an instance of its first argument (numpy.ndarray in real files).
                if let Some(&cls) = argv.first()
                    && !self.callable(cls)
                {
                    self.refuse(cls, "class given to numpy's _reconstruct");
                }
                self.err_object(callable, args)
            }
            ("copyreg" | "copy_reg", "_reconstructor" | "__newobj__" | "__newobj_ex__") => {
                // copyreg builds an instance of its first argument (and `_reconstructor` calls its base's __new__
                // and __init__): both must be allowed as the call itself would be.
                let what = format!("class given to copyreg.{name}");
                let cls = *argv.first().ok_or_else(|| self.err(format!("copyreg.{name} without a class")))?;
                if !self.instantiable(cls) {
                    self.refuse(cls, &what);
                }
                if name == "_reconstructor"
                    && let Some(&base) = argv.get(1)
                    && !self.callable(base)
                {
                    self.refuse(base, "base class given to copyreg._reconstructor");
                }
                self.err_object(callable, args)
            }
            ("torch._tensor", "_rebuild_from_type_v2") | ("torch._tensor", "_rebuild_from_type") => {
                // (func, type, args, state): the subclass is dropped, the tensor inside is kept.
                if depth > 4 {
                    return Err(self.limit("nested _rebuild_from_type calls".into()));
                }
                let (Some(&func), Some(&ty), Some(&inner)) = (argv.first(), argv.get(1), argv.get(2)) else {
                    return Err(self.err("_rebuild_from_type_v2 needs (func, type, args, state)"));
                };
                self.check_role(ty, Role::TensorType, "tensor type given to _rebuild_from_type_v2");
                let id = self.call(func, inner, Call::FromType, depth + 1)?;
                // Wrapper subclasses (DTensor) keep their content in the state: keep it on the object.
                if let (Some(&st), Node::Object { state, .. }) = (argv.get(3), &mut self.heap.nodes[id as usize]) {
                    *state = Some(st);
                }
                Ok(id)
            }
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
                let id = self.alloc(Node::Dict(Vec::new()))?;
                if let Some(&init) = argv.first()
                    && let Some(seq) = self.heap.as_seq(init).map(<[Id]>::to_vec)
                {
                    let mut pairs = Vec::new();
                    for p in seq {
                        match self.heap.as_seq(p) {
                            Some(&[k, v]) => pairs.push((k, v)),
                            _ => {
                                return Err(self.err("OrderedDict argument is not a list of pairs"));
                            }
                        }
                    }
                    self.set_items(id, pairs)?;
                }
                Ok(id)
            }
            ("torch", "Size") | ("builtins" | "__builtin__", "tuple") => {
                let items = match argv.first() {
                    Some(&seq) => self.heap.as_seq(seq).map(<[Id]>::to_vec).unwrap_or_default(),
                    None => Vec::new(),
                };
                self.alloc(Node::Tuple(items))
            }
            ("builtins" | "__builtin__", "set" | "frozenset") => {
                let items = match argv.first() {
                    Some(&seq) => self.heap.as_seq(seq).map(<[Id]>::to_vec).unwrap_or_default(),
                    None => Vec::new(),
                };
                self.alloc(Node::Set(items))
            }
            ("_codecs", "encode") => {
                // Protocol 2 pickles bytes as _codecs.encode(text, 'latin1').
                let text = argv.first().and_then(|&a| self.heap.as_str(a)).map(str::to_string);
                match text {
                    Some(t) => {
                        let bytes: Option<Vec<u8>> = t.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                        let bytes = bytes.ok_or_else(|| self.err("_codecs.encode of non-latin1 text"))?;
                        self.alloc(Node::Bytes(bytes))
                    }
                    None => self.err_object(callable, args),
                }
            }
            ("builtins" | "__builtin__", "bytearray" | "bytes") => {
                match argv.first().map(|&a| self.heap.get(a).clone()) {
                    Some(Node::Bytes(b)) => self.alloc(Node::Bytes(b)),
                    None => self.alloc(Node::Bytes(Vec::new())),
                    _ => self.err_object(callable, args),
                }
            }
            _ => self.err_object(callable, args),
        }
    }

    /// Notes a global the pickle names: one off the allowlist is reported even if it is never called.
    fn note_global(&mut self, module: &str, name: &str) {
        if let Some(all) = &mut self.all
            && all.list.len() < MAX_LOGGED_GLOBALS
        {
            all.add(policy::full_name(module, name), self.op_offset, "named");
        }
        if policy::classify(module, name).is_none() && !policy::user_allows(module, name, &self.allowed) {
            self.named.add(policy::full_name(module, name), self.op_offset, "named");
        }
    }

    /// Whether calling `id` is allowed: a global on the allowlist as callable, or one the user allows.
    fn callable(&self, id: Id) -> bool {
        matches!(self.heap.get(id), Node::Global { module, name } if policy::callable(module, name, &self.allowed))
    }

    /// Whether building an instance of `id` with `__new__` and its state (no `__init__`) is allowed.
    fn instantiable(&self, id: Id) -> bool {
        matches!(self.heap.get(id), Node::Global { module, name } if policy::instantiable(module, name, &self.allowed))
    }

    /// Records that `id` would be called (`how`) though it is not allowed.
    fn refuse(&mut self, id: Id, how: &str) {
        let global = match self.heap.get(id) {
            Node::Global { module, name } => policy::full_name(module, name),
            _ => match self.heap.describe(id) {
                d if d.starts_with('<') => d,
                d => format!("<the value {d}>"),
            },
        };
        self.refused.add(global, self.op_offset, how);
    }

    /// Refuses `id` unless it is a global of `role` on the allowlist, or one the user allows.
    fn check_role(&mut self, id: Id, role: Role, how: &str) {
        let ok = match self.heap.get(id) {
            Node::Global { module, name } => {
                policy::classify(module, name).is_some_and(|r| r.role == role)
                    || policy::user_allows(module, name, &self.allowed)
            }
            _ => false,
        };
        if !ok {
            self.refuse(id, how);
        }
    }

    /// A persistent id `('storage', type, key, location, numel)`: the type must be a storage class, as torch's
    /// loader reads attributes of it.
    fn check_storage_type(&mut self, pid: Id) {
        if let Some(&[tag, ty, ..]) = self.heap.as_seq(pid)
            && self.heap.as_str(tag) == Some("storage")
        {
            self.check_role(ty, Role::Storage, "used as a storage type");
        }
    }

    /// Backward hooks: torch.save always writes an empty dict; every entry of a non-empty one would be called.
    fn check_hooks(&mut self, hooks: Id) {
        let entries: Vec<Id> = match self.heap.get(hooks) {
            Node::Dict(items) => items.iter().map(|&(_, v)| v).collect(),
            _ => return,
        };
        for hook in entries {
            let allowed = matches!(self.heap.get(hook), Node::Global { module, name }
                if policy::user_allows(module, name, &self.allowed));
            if !allowed {
                self.refuse(hook, "used as a backward hook");
            }
        }
    }

    fn err_object(&mut self, callable: Id, args: Id) -> Result<Id> {
        self.alloc(Node::Object { callable, args, state: None, items: vec![], list: vec![] })
    }

    fn rebuild_tensor(&mut self, func: &str, argv: &[Id]) -> Result<Id> {
        let need = if func == "_rebuild_tensor" { 4 } else { 6 };
        if argv.len() < need {
            return Err(self.err(format!("{func} needs at least {need} arguments, got {}", argv.len())));
        }
        if func != "_rebuild_tensor" {
            self.check_hooks(argv[5]);
        }
        let storage = argv[0];
        let offset = self
            .heap
            .as_int(argv[1])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| self.err(format!("{func}: storage offset is not a non-negative int")))?;
        let shape = self.int_list(argv[2], func, "size")?;
        let strides = self.int_list(argv[3], func, "stride")?;
        if shape.len() != strides.len() {
            return Err(self.err(format!("{func}: size has {} dims but stride has {}", shape.len(), strides.len())));
        }
        let dtype = if func == "_rebuild_tensor_v3" { argv.get(6).copied() } else { None };
        self.alloc(Node::Tensor(TensorNode { storage, offset, shape, strides, dtype }))
    }

    fn int_list(&self, id: Id, func: &str, what: &str) -> Result<Vec<u64>> {
        let seq = self.heap.as_seq(id).ok_or_else(|| self.err(format!("{func}: {what} is not a tuple")))?;
        seq.iter()
            .map(|&v| {
                self.heap
                    .as_int(v)
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or_else(|| self.err(format!("{func}: {what} holds a value that is not a non-negative int")))
            })
            .collect()
    }
}

/// The memo: keys 0, 1, 2, ... (what pickle writes, and all MEMOIZE can make) in a vector, any others in a map.
#[derive(Default)]
struct Memo {
    dense: Vec<Id>,
    sparse: HashMap<u32, Id>,
    /// Entries stored, for the limit and for MEMOIZE's next key (Python's `len(memo)`).
    len: usize,
}

impl Memo {
    const EMPTY: Id = Id::MAX;

    fn get(&self, key: u32) -> Option<Id> {
        match self.dense.get(key as usize) {
            Some(&id) if id != Self::EMPTY => Some(id),
            Some(_) => None,
            None => self.sparse.get(&key).copied(),
        }
    }

    fn put(&mut self, key: u32, id: Id) {
        let k = key as usize;
        if let Some(slot) = self.dense.get_mut(k) {
            if *slot == Self::EMPTY {
                self.len += 1;
            }
            *slot = id;
        } else if k == self.dense.len() && !self.sparse.contains_key(&key) {
            self.dense.push(id);
            self.len += 1;
        } else if self.sparse.insert(key, id).is_none() {
            self.len += 1;
        }
    }
}

/// An immutable value the VM keeps one node of.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Const {
    None,
    Bool(bool),
    Int(i64),
    EmptyTuple,
}

/// LONG1/LONG4 payload: little-endian two's complement.
fn long_node(b: Vec<u8>) -> Node {
    if b.is_empty() {
        return Node::Int(0);
    }
    if b.len() <= 8 {
        let neg = b.last().is_some_and(|&x| x & 0x80 != 0);
        let mut buf = if neg { [0xFFu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(&b);
        return Node::Int(i64::from_le_bytes(buf));
    }
    Node::BigInt(b)
}

/// Decodes a protocol-0 `UNICODE` argument (raw-unicode-escape: only `\uXXXX` and `\UXXXXXXXX`).
fn unescape_raw_unicode(line: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b == b'\\' && i + 1 < line.len() && (line[i + 1] == b'u' || line[i + 1] == b'U') {
            let n = if line[i + 1] == b'u' { 4 } else { 8 };
            let hex = std::str::from_utf8(line.get(i + 2..i + 2 + n)?).ok()?;
            out.push(char::from_u32(u32::from_str_radix(hex, 16).ok()?)?);
            i += 2 + n;
        } else {
            // raw-unicode-escape stores other code points below 256 as latin-1 bytes.
            out.push(b as char);
            i += 1;
        }
    }
    Some(out)
}

/// Decodes a protocol-0 `STRING` argument: a quoted Python 2 literal with backslash escapes.
fn unquote_string(line: &[u8]) -> Option<Vec<u8>> {
    let q = *line.first()?;
    if (q != b'\'' && q != b'"') || line.len() < 2 || *line.last()? != q {
        return None;
    }
    let body = &line[1..line.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'\\' {
            out.push(body[i]);
            i += 1;
            continue;
        }
        let c = *body.get(i + 1)?;
        i += 2;
        match c {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0' => out.push(0),
            b'\\' | b'\'' | b'"' => out.push(c),
            b'x' => {
                let hex = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            _ => {
                out.push(b'\\');
                out.push(c);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Input;

    fn run(bytes: &[u8]) -> Result<(Heap, Id)> {
        let input = Input::new("t.pkl", Box::new(bytes.to_vec()));
        let mut cur = ByteCursor::new(&input, 0, input.len())?;
        parse(&mut cur, Limits::default())
    }

    #[test]
    fn protocol2_dict_with_memo_shares_values() {
        // {'a': [1], 'b': <same list>} as pickle.dumps(..., protocol=2) writes it.
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02K\x01aX\x01\x00\x00\x00bq\x03h\x02u.";
        let (heap, root) = run(p).unwrap();
        let a = heap.dict_get(root, "a").unwrap();
        let b = heap.dict_get(root, "b").unwrap();
        assert_eq!(a, b);
        assert_eq!(heap.as_seq(a).unwrap().len(), 1);
    }

    #[test]
    fn a_repeated_key_keeps_its_first_position_and_the_last_value() {
        // Python: d = {'a': 1, 'b': 2}; d['a'] = 3; d[1] = 4; d[True] = 5  ->  {'a': 3, 'b': 2, 1: 5}
        // as pickle.dumps(d, protocol=2) would write it after the edits (SETITEMS, then SETITEM twice).
        let p =
            b"\x80\x02}(X\x01\x00\x00\x00aK\x01X\x01\x00\x00\x00bK\x02X\x01\x00\x00\x00aK\x03uK\x01K\x04s\x88K\x05s.";
        let (heap, root) = run(p).unwrap();
        let Node::Dict(items) = heap.get(root) else { panic!("not a dict") };
        let shown: Vec<(String, i64)> =
            items.iter().map(|&(k, v)| (heap.describe(k), heap.as_int(v).unwrap())).collect();
        assert_eq!(shown, [("\"a\"".to_string(), 3), ("\"b\"".to_string(), 2), ("1".to_string(), 5)]);
    }

    #[test]
    fn a_dict_with_many_keys_builds_in_linear_time() {
        // 200,000 distinct keys, then all of them again: with a scan per insert this takes minutes.
        let mut p = vec![0x80, 2, b'}', b'('];
        for round in 0..2u32 {
            for i in 0..200_000u32 {
                p.push(b'J');
                p.extend(i.to_le_bytes());
                p.push(b'J');
                p.extend((i + round).to_le_bytes());
            }
        }
        p.extend(*b"u.");
        let (heap, root) = run(&p).unwrap();
        let Node::Dict(items) = heap.get(root) else { panic!("not a dict") };
        assert_eq!(items.len(), 200_000);
        assert_eq!(heap.as_int(items[7].1), Some(8));
    }

    #[test]
    fn constants_share_one_node_and_stay_immutable() {
        // [None, None, True, 7, 7, (), (), 70000, 70000] as pickle.dumps(..., protocol=2) writes it, minus the memo.
        let p = b"\x80\x02](NN\x88K\x07K\x07))Jp\x11\x01\x00Jp\x11\x01\x00e.";
        let (heap, root) = run(p).unwrap();
        let items = heap.as_seq(root).unwrap().to_vec();
        assert_eq!(items.len(), 9);
        assert_eq!((items[0], items[3], items[5]), (items[1], items[4], items[6]));
        assert_ne!(items[7], items[8], "large ints are not interned");
        assert_eq!(heap.as_int(items[4]), Some(7));
        assert_eq!(heap.as_int(items[8]), Some(70000));
        assert_eq!(heap.get(items[6]), &Node::Tuple(Vec::new()));
    }

    #[test]
    fn memo_keys_dense_and_sparse() {
        let mut m = Memo::default();
        m.put(5, 50);
        for k in 0..5 {
            m.put(k, k * 10);
        }
        m.put(5, 55);
        m.put(1, 11);
        m.put(1 << 30, 7);
        assert_eq!(m.len, 7);
        assert_eq!((m.get(0), m.get(1), m.get(4), m.get(5), m.get(6)), (Some(0), Some(11), Some(40), Some(55), None));
        assert_eq!((m.get(1 << 30), m.get(u32::MAX)), (Some(7), None));
    }

    #[test]
    fn small_dicts_grow_into_the_index_without_losing_keys() {
        // 20 keys, then each again with a new value: positions stay, values are the last, across the switch from
        // scanning to the index at 8 items; dict_get finds every key either way.
        let mut p = vec![0x80, 2, b'}'];
        for round in 0..2u8 {
            for i in 0..20u8 {
                p.extend([0x8c, 2, b'k', b'a' + i, b'K', i + round * 100, b's']);
            }
        }
        p.push(b'.');
        let (heap, root) = run(&p).unwrap();
        let Node::Dict(items) = heap.get(root) else { panic!("not a dict") };
        assert_eq!(items.len(), 20);
        for i in 0..20u8 {
            let key = format!("k{}", (b'a' + i) as char);
            assert_eq!(heap.as_str(items[i as usize].0), Some(key.as_str()));
            assert_eq!(heap.dict_get(root, &key).and_then(|v| heap.as_int(v)), Some(i as i64 + 100));
        }
        assert_eq!(heap.dict_get(root, "zz"), None);
    }

    #[test]
    fn protocol0_text_opcodes() {
        // pickle.dumps({'x': (1, 2.5, 'hi', None)}, protocol=0)
        let p = b"(dp0\nVx\np1\n(I1\nF2.5\nVhi\np2\nNtp3\ns.";
        let (heap, root) = run(p).unwrap();
        let t = heap.dict_get(root, "x").unwrap();
        let items = heap.as_seq(t).unwrap();
        assert_eq!(heap.as_int(items[0]), Some(1));
        assert_eq!(heap.get(items[1]), &Node::Float(2.5));
        assert_eq!(heap.as_str(items[2]), Some("hi"));
    }

    #[test]
    fn unknown_calls_become_inert_objects() {
        let p = b"cargparse\nNamespace\n)R}(Vlr\nF0.1\nub.";
        let (heap, root) = run(p).unwrap();
        match heap.get(root) {
            Node::Object { callable, state: Some(_), .. } => {
                assert_eq!(heap.global_name(*callable).unwrap(), "argparse.Namespace")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_object_whose_state_is_itself_does_not_recurse() {
        // Namespace() with BUILD(state = the object itself), then a field lookup (found by fuzzing).
        let (heap, root) = run(b"cargparse\nNamespace\n)R2b.").unwrap();
        assert_eq!(heap.dict_get(root, "x"), None);
        assert_eq!(heap.describe(root), "<argparse.Namespace object>");
    }

    #[test]
    fn mark_nesting_is_capped() {
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', 20_000));
        let e = run(&p).unwrap_err();
        assert_eq!(e.label(), "limit");
        assert!(e.to_string().contains("nesting depth"), "{e}");
    }

    #[test]
    fn memo_is_capped() {
        let input = Input::new(
            "m.pkl",
            Box::new(
                b"\x80\x02N"
                    .iter()
                    .copied()
                    .chain((0..10u32).flat_map(|i| {
                        let mut v = vec![b'r'];
                        v.extend(i.to_le_bytes());
                        v
                    }))
                    .chain(*b".")
                    .collect::<Vec<u8>>(),
            ),
        );
        let mut cur = ByteCursor::new(&input, 0, input.len()).unwrap();
        let limits = Limits { max_memo: 5, ..Limits::default() };
        let e = parse(&mut cur, limits).unwrap_err();
        assert!(e.to_string().contains("memo"), "{e}");
    }

    #[test]
    fn lying_lengths_fail_without_allocating() {
        // BINBYTES8 announcing 2^60 bytes in a tiny file.
        let mut p = vec![0x80, 4, 0x8e];
        p.extend((1u64 << 60).to_le_bytes());
        let e = run(&p).unwrap_err();
        assert_eq!(e.label(), "truncated");
    }

    #[test]
    fn long1_negative_and_large() {
        let (heap, root) = run(b"\x80\x02\x8a\x02\x00\xff.").unwrap();
        assert_eq!(heap.as_int(root), Some(-256));
    }

    /// `FRAME` of `body.len() + extra` bytes around `body`.
    fn frame(body: &[u8], extra: i64) -> Vec<u8> {
        let mut v = vec![0x95];
        v.extend(((body.len() as i64 + extra) as u64).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    fn pickle_err(bytes: &[u8]) -> String {
        let e = run(bytes).unwrap_err();
        assert_eq!(e.label(), "pickle", "{e}");
        assert!(e.to_string().contains("t.pkl"), "{e}");
        e.to_string()
    }

    #[test]
    fn frames_as_pickle_writes_them_parse() {
        // pickle.dumps({'a': 1, 'b': b'x' * 70000, 'c': 2}, protocol=4): a frame, the large bytes unframed (written
        // outside any frame), then a second frame that ends with STOP. An empty frame reads the same in every reader.
        let mut p = vec![0x80, 4];
        p.extend(frame(b"}\x94(\x8c\x01a\x94K\x01\x8c\x01b\x94", 0));
        p.push(0x8e);
        p.extend(70000u64.to_le_bytes());
        p.extend(std::iter::repeat_n(b'x', 70000));
        p.extend(frame(b"", 0));
        p.extend(frame(b"\x94\x8c\x01c\x94K\x02u.", 0));
        let (heap, root) = run(&p).unwrap();
        assert_eq!(heap.dict_get(root, "c").and_then(|v| heap.as_int(v)), Some(2));
        assert_eq!(heap.describe(heap.dict_get(root, "b").unwrap()), "<70000 bytes>");
    }

    #[test]
    fn a_frame_larger_than_the_pickle_is_refused() {
        // pickle.py would read the short frame and go on; _pickle.c says the data was truncated.
        let truncated = |bytes: &[u8]| {
            let e = run(bytes).unwrap_err();
            assert_eq!(e.label(), "truncated", "{e}");
            e.to_string()
        };
        let msg = truncated(&[&[0x80, 4][..], &frame(b"K\x01.", 1)].concat());
        assert!(msg.starts_with("t.pkl: ") && msg.contains("FRAME of 4 bytes at pickle byte 2, but only 3"), "{msg}");
        let mut huge = vec![0x80, 4, 0x95];
        huge.extend(u64::MAX.to_le_bytes());
        huge.extend(b"K\x01.");
        assert!(truncated(&huge).contains("only 3 bytes"));
    }

    #[test]
    fn an_opcode_straddling_its_frame_end_is_refused() {
        // SHORT_BINUNICODE 'abc' whose last byte lies after the frame: pickle.py raises "pickle exhausted before
        // end of frame"; _pickle.c reading a file drops the frame's rest and reads the argument from after it.
        let msg = pickle_err(&[&[0x80, 4][..], &frame(b"\x8c\x03ab", 0), b"c."].concat());
        assert!(msg.contains("bad pickle at byte 11") && msg.contains("past the end of its frame at byte 15"), "{msg}");
        // A text line (GLOBAL's) that ends after the frame.
        let msg = pickle_err(&[&[0x80, 2][..], &frame(b"cbuiltins\nse", 0), b"t\n)R."].concat());
        assert!(msg.contains("past the end of its frame"), "{msg}");
        // The 8-byte length of a BINBYTES8 split by the frame's end.
        let mut p = vec![0x80, 4];
        p.extend(frame(b"\x8e\x01\x00\x00", 0));
        p.extend([0, 0, 0, 0, 0, b'z', b'.']);
        assert!(pickle_err(&p).contains("past the end of its frame"));
    }

    #[test]
    fn a_call_after_a_frame_differential_is_still_named() {
        // fickling appends opcodes after a pickle's last frame without growing it: the call that follows the
        // straddling opcode is what the file is, so the refusal names it (it outranks the differential).
        let p = [&[0x80, 4][..], &frame(b"\x8c\x02os\x8c\x06sys", 0), b"tem\x93\x8c\x02id\x85R."].concat();
        assert!(pickle_err(&p[..p.len() - 2]).contains("past the end of its frame"));
        let e = run(&p).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::UnsafeGlobal { calls, .. } if calls[0].global == "os.system"), "{e}");
    }

    #[test]
    fn a_frame_inside_a_frame_is_refused() {
        // pickle.py: "beginning of a new frame before end of current frame"; _pickle.c just reads on.
        let inner = frame(b"K\x01.", 0);
        let msg = pickle_err(&[&[0x80, 4][..], &frame(&[b"N0", &inner[..]].concat(), 0)].concat());
        assert!(msg.contains("FRAME begins inside the frame"), "{msg}");
        // Even when the inner FRAME is the outer frame's last 9 bytes.
        let msg = pickle_err(&[&[0x80, 4][..], &frame(&inner[..9], 0), b"K\x01."].concat());
        assert!(msg.contains("FRAME begins inside the frame"), "{msg}");
    }

    #[test]
    fn stop_before_its_frame_end_is_refused() {
        // The frame claims bytes after STOP: reading a file, Python skips them, so the next pickle starts after
        // them, not after STOP (the legacy torch format is several pickles in a row).
        let msg = pickle_err(&[&[0x80, 4][..], &frame(b"K\x01.K\x02.", 0)].concat());
        assert!(msg.contains("STOP inside a frame that runs 3 bytes further"), "{msg}");
    }

    #[test]
    fn bytes_after_stop_are_refused_only_where_the_pickle_must_fill_its_range() {
        let bytes = b"\x80\x02K\x01.PK\x05\x06";
        let (heap, root) = run(bytes).unwrap();
        assert_eq!(heap.as_int(root), Some(1));
        let input = Input::new("t.pkl", Box::new(bytes.to_vec()));
        let mut cur = ByteCursor::new(&input, 0, input.len()).unwrap();
        let e = parse_all(&mut cur, Limits::default()).unwrap_err();
        assert_eq!(e.label(), "pickle");
        assert_eq!(
            e.to_string(),
            "t.pkl: bad pickle at byte 5: 4 bytes after the pickle's STOP at byte 4; Python stops reading at STOP, \
             so no reader would check them"
        );
        let mut cur = ByteCursor::new(&input, 0, 5).unwrap();
        assert!(parse_all(&mut cur, Limits::default()).is_ok());
    }

    #[test]
    fn stack_underflow_is_an_error() {
        assert_eq!(run(b"\x80\x02a.").unwrap_err().label(), "pickle");
        assert_eq!(run(b"\x80\x02").unwrap_err().label(), "truncated");
    }
}
