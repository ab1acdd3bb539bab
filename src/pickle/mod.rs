//! A pickle reader that builds data and never executes anything.
//!
//! Values live in an arena ([`Heap`]) and refer to each other by [`Id`], so shared and even cyclic
//! structures (memo references) cost nothing extra, and dropping a hostile, deeply nested pickle cannot
//! overflow the stack. A `GLOBAL` is only a name. `REDUCE` of torch's rebuild functions yields a
//! [`Node::Tensor`]; a handful of harmless builtins (`OrderedDict`, `torch.Size`, `_codecs.encode`, sets)
//! become plain data; calls of the data classes on the allowlist ([`policy`]) become inert [`Node::Object`]s
//! that record the callable and its arguments. A call of anything else is refused: the parse names every such
//! global and where, and fails.

pub mod policy;
mod vm;

pub use vm::{Limits, ensure_consumed, parse, parse_all};

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// Whether a pickle stream may begin with opcode `b`: PROTO, or an opcode of protocols 0 and 1 that pushes
/// without popping (a pickle written without PROTO starts with one of these). Not PERSID: torch.load's first
/// unpickler has no persistent_load, so Python refuses such a stream (and `PK\x05\x06`, an empty zip, starts so).
pub fn can_start(b: u8) -> bool {
    // Protocols 0 and 1 only: protocol 2 and later begin with PROTO, so 0x88 and up (a PNG's 0x89) start nothing.
    matches!(
        b,
        0x80 | b'('
            | b'c'
            | b']'
            | b'}'
            | b')'
            | b'N'
            | b'I'
            | b'L'
            | b'S'
            | b'V'
            | b'J'
            | b'K'
            | b'M'
            | b'U'
            | b'T'
            | b'X'
            | b'F'
            | b'G'
            | b'i'
    )
}

/// Index of a node in a [`Heap`].
pub type Id = u32;

/// A torch tensor reference: a view over a storage that a persistent id names.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorNode {
    /// The persistent-id node (a `('storage', type, key, location, numel)` tuple in torch files).
    pub storage: Id,
    /// Offset of element 0 of the view, in elements.
    pub offset: u64,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub strides: Vec<u64>,
    /// Explicit dtype (only `_rebuild_tensor_v3` carries one; otherwise the storage type decides).
    pub dtype: Option<Id>,
}

/// One pickled value.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `None`
    None,
    /// `True` / `False`
    Bool(bool),
    /// An int that fits in i64.
    Int(i64),
    /// A larger int, as little-endian two's complement bytes.
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A text string.
    Str(String),
    /// A byte string.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Id>),
    /// A list.
    List(Vec<Id>),
    /// A dict, in insertion order.
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset.
    Set(Vec<Id>),
    /// A global name: `module.name`. Never resolved.
    Global {
        /// Module path.
        module: String,
        /// Attribute name.
        name: String,
    },
    /// The inert result of calling or instantiating something that is not plain data.
    Object {
        /// The callable (usually a [`Node::Global`]).
        callable: Id,
        /// Its positional arguments (a tuple node).
        args: Id,
        /// State given by `BUILD`, if any.
        state: Option<Id>,
        /// Items given by `SETITEM(S)` (dict subclasses).
        items: Vec<(Id, Id)>,
        /// Items given by `APPEND(S)` (list subclasses).
        list: Vec<Id>,
    },
    /// A persistent id, left for the format reader to resolve.
    PersistentId(Id),
    /// A torch tensor reference.
    Tensor(TensorNode),
}

/// The arena that owns every node of one pickle.
#[derive(Debug, Default)]
pub struct Heap {
    nodes: Vec<Node>,
    payload_bytes: u64,
    /// Where each str/int key sits in its dict: the VM finds repeated keys and [`Heap::dict_get`] finds fields
    /// without scanning, so a dict of a million keys costs a million steps, not a million squared.
    keys: DictKeys,
    /// Globals off the allowlist that the pickle names without calling them, for reports.
    pub named_globals: Vec<crate::error::GlobalUse>,
}

/// A hash index over the str and int keys of every dict in a heap: (dict, hash of key) -> positions in that
/// dict. Keys are hashed, not copied (a million string keys would double the pickle's payload); positions that
/// share a hash are told apart by comparing the key nodes. The hasher is randomly keyed, so a crafted pickle
/// cannot make its keys collide.
#[derive(Debug, Default)]
struct DictKeys {
    hasher: RandomState,
    slots: HashMap<(Id, u64), Positions>,
}

/// The positions in one dict whose keys share a hash: nearly always one.
#[derive(Debug)]
enum Positions {
    One(u32),
    Many(Vec<u32>),
}

impl DictKeys {
    /// The hash of a key that dicts index (str, int, bool as int), or `None` for other keys.
    fn hash(&self, key: &Node) -> Option<u64> {
        match key {
            Node::Str(s) => Some(self.hash_str(s)),
            Node::Int(i) => Some(self.hasher.hash_one((1u8, *i))),
            Node::Bool(b) => Some(self.hasher.hash_one((1u8, i64::from(*b)))),
            _ => None,
        }
    }

    fn hash_str(&self, s: &str) -> u64 {
        self.hasher.hash_one((0u8, s))
    }

    fn positions(&self, dict: Id, hash: u64) -> &[u32] {
        match self.slots.get(&(dict, hash)) {
            Some(Positions::One(p)) => std::slice::from_ref(p),
            Some(Positions::Many(v)) => v,
            None => &[],
        }
    }

    fn add(&mut self, dict: Id, hash: u64, position: u32) {
        let slot = self.slots.entry((dict, hash)).or_insert(Positions::Many(Vec::new()));
        match slot {
            Positions::Many(v) if v.is_empty() => *slot = Positions::One(position),
            Positions::Many(v) => v.push(position),
            Positions::One(first) => *slot = Positions::Many(vec![*first, position]),
        }
    }
}

/// Dicts with fewer items than this are scanned (most pickled dicts are a dataclass's two or three fields); from
/// this many on, their keys are in the index.
const INDEX_FROM: usize = 8;

/// Whether two dict keys are equal as Python compares them (str with str, int with int or bool).
fn same_key(a: &Node, b: &Node) -> bool {
    let int = |n: &Node| match n {
        Node::Int(i) => Some(*i),
        Node::Bool(b) => Some(i64::from(*b)),
        _ => None,
    };
    match (a, b) {
        (Node::Str(x), Node::Str(y)) => x == y,
        _ => int(a).is_some_and(|x| int(b) == Some(x)),
    }
}

impl Heap {
    /// The node behind `id`. Ids come only from this heap, so they are always in range.
    pub fn get(&self, id: Id) -> &Node {
        &self.nodes[id as usize]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the heap is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `module.name` when `id` is a global.
    pub fn global_name(&self, id: Id) -> Option<String> {
        match self.get(id) {
            Node::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// The string behind `id`, if it is one.
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer behind `id`, if it is one (bools count as 0/1, as in Python).
    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The elements of a tuple or list.
    pub fn as_seq(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// Looks up a string key in a dict node, or in an object's dict state.
    pub fn dict_get(&self, id: Id, key: &str) -> Option<Id> {
        // Objects hold their fields in a state dict; a few hops at most (a hostile state can point at itself).
        let mut at = id;
        for _ in 0..8 {
            match self.get(at) {
                Node::Dict(items) => {
                    let hash = (items.len() >= INDEX_FROM).then(|| self.keys.hash_str(key));
                    let p = self.find_key(at, hash, |k| matches!(k, Node::Str(s) if s == key))?;
                    return items.get(p as usize).map(|&(_, v)| v);
                }
                Node::Object { state: Some(s), .. } => at = *s,
                _ => return None,
            }
        }
        None
    }

    /// The position in dict `dict` of the key for which `is_key` holds: a scan of a small dict, else through the
    /// key index (`hash`: the key's hash, `None` for keys the index does not hold).
    fn find_key(&self, dict: Id, hash: Option<u64>, is_key: impl Fn(&Node) -> bool) -> Option<u32> {
        let Node::Dict(items) = self.get(dict) else { return None };
        if items.len() < INDEX_FROM {
            return items.iter().position(|&(k, _)| is_key(self.get(k))).and_then(|p| u32::try_from(p).ok());
        }
        self.keys
            .positions(dict, hash?)
            .iter()
            .copied()
            .find(|&p| items.get(p as usize).is_some_and(|&(k, _)| is_key(self.get(k))))
    }

    /// Sets `dict[k] = v` with Python's semantics for str and int keys (a bool is the int 0 or 1): a repeated key
    /// keeps its first position and takes the new value. Other keys (tuples, floats, ...) are appended as they
    /// come. `None` when `dict` is not a dict.
    fn dict_set(&mut self, dict: Id, k: Id, v: Id) -> Option<()> {
        let Node::Dict(items) = self.get(dict) else { return None };
        let len = items.len();
        let key = self.get(k);
        let hash = if len + 1 >= INDEX_FROM { self.keys.hash(key) } else { None };
        let found = self.find_key(dict, hash, |other| same_key(other, key));
        let Some(Node::Dict(items)) = self.nodes.get_mut(dict as usize) else { return None };
        if let Some(item) = found.and_then(|p| items.get_mut(p as usize)) {
            item.1 = v;
            return Some(());
        }
        items.push((k, v));
        if len + 1 == INDEX_FROM {
            // The dict just grew out of scanning: index every key it holds.
            let Node::Dict(items) = self.get(dict) else { return None };
            let hashed: Vec<(u32, u64)> = items
                .iter()
                .enumerate()
                .filter_map(|(p, &(key, _))| Some((u32::try_from(p).ok()?, self.keys.hash(self.get(key))?)))
                .collect();
            for (p, h) in hashed {
                self.keys.add(dict, h, p);
            }
        } else if let (Some(h), Ok(p)) = (hash, u32::try_from(len)) {
            self.keys.add(dict, h, p);
        }
        Some(())
    }

    /// A short human description of a node, for messages and `inspect`.
    pub fn describe(&self, id: Id) -> String {
        match self.get(id) {
            Node::None => "None".into(),
            Node::Bool(b) => {
                if *b {
                    "True".into()
                } else {
                    "False".into()
                }
            }
            Node::Int(v) => v.to_string(),
            Node::BigInt(_) => "<big int>".into(),
            Node::Float(v) => v.to_string(),
            Node::Str(s) => format!("{s:?}"),
            Node::Bytes(b) => format!("<{} bytes>", b.len()),
            Node::Tuple(v) => format!("<tuple of {}>", v.len()),
            Node::List(v) => format!("<list of {}>", v.len()),
            Node::Dict(v) => format!("<dict of {}>", v.len()),
            Node::Set(v) => format!("<set of {}>", v.len()),
            Node::Global { module, name } => format!("{module}.{name}"),
            // Not recursive: a hostile pickle can chain calls of calls arbitrarily deep.
            Node::Object { callable, .. } => match self.global_name(*callable) {
                Some(n) => format!("<{n} object>"),
                None => "<object>".into(),
            },
            Node::PersistentId(_) => "<persistent id>".into(),
            Node::Tensor(t) => format!("<tensor {:?}>", t.shape),
        }
    }
}
