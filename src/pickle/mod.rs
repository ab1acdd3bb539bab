//! A pickle reader that builds data and never executes anything.
//!
//! Values live in an arena ([`Heap`]) and refer to each other by [`Id`], so shared and even cyclic
//! structures (memo references) cost nothing extra, and dropping a hostile, deeply nested pickle cannot
//! overflow the stack. A `GLOBAL` is only a name. `REDUCE` of torch's rebuild functions yields a
//! [`Node::Tensor`]; a handful of harmless builtins (`OrderedDict`, `torch.Size`, `_codecs.encode`, sets)
//! become plain data; every other call becomes an inert [`Node::Object`] that records the callable and its
//! arguments. Calls to globals that could run code (`os.system`, `builtins.eval`, `subprocess.Popen`, ...)
//! are refused with an error that names them.

mod vm;

pub use vm::{Limits, parse};

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
                    return items.iter().rev().find(|(k, _)| self.as_str(*k) == Some(key)).map(|(_, v)| *v);
                }
                Node::Object { state: Some(s), .. } => at = *s,
                _ => return None,
            }
        }
        None
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
