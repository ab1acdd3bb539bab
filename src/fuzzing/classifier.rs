//! The classifier fuzz target: bytes steer a generator of well-formed pickles built from globals (on the allowlist,
//! off it, in Python 2 spelling) and every call shape the reader knows: REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD
//! on a global, copyreg's builders, `_rebuild_from_type_v2`, storage types in persistent ids, backward hooks and
//! calls of computed values; some globals are allowed as `--allow-global` would. The generator works out on its own
//! what must be refused: a call is allowed only if its global is on the allowlist as callable (or allowed by the
//! user; NEWOBJ and copyreg's builders may also build the classes listed as rebuilt with `__new__` only), a storage type only if it is a storage class, a tensor type only if it is a tensor class, BUILD on a
//! global and a hook never. The parse must agree exactly: it succeeds iff nothing is to be refused, and a refusal
//! names exactly those globals (plus the off-list ones only named).

use crate::error::{ErrorKind, GlobalUse};
use crate::io::{AllowedGlobals, ByteCursor, Input};
use crate::pickle::policy::{self, Role};
use std::collections::BTreeSet;

const MODULES: &[&str] = &[
    "os",
    "posix",
    "subprocess",
    "builtins",
    "__builtin__",
    "torch",
    "torch._utils",
    "collections",
    "copyreg",
    "copy_reg",
    "numpy",
    "pydoc",
    "_functools",
    "argparse",
    "mypkg.sub",
];
const NAMES: &[&str] = &[
    "system",
    "Popen",
    "eval",
    "getattr",
    "map",
    "set",
    "OrderedDict",
    "Size",
    "FloatStorage",
    "float32",
    "Namespace",
    "_reconstructor",
    "locate",
    "partial",
    "Tensor",
    "x",
];

/// Callables whose arguments the reader interprets (pairs, latin-1 text, tensors, a class to build): the generator
/// only promises well-formed pickles, so it never calls these with random arguments (they have shapes of their own).
fn interprets_args(module: &str, name: &str) -> bool {
    const INTERPRETED: &[&str] = &[
        "collections.OrderedDict",
        "builtins.dict",
        "_codecs.encode",
        "builtins.bytes",
        "builtins.bytearray",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    ];
    matches!(policy::classify(module, name).map(|r| r.role), Some(Role::Rebuild | Role::Reconstruct))
        || INTERPRETED.contains(&policy::full_name(module, name).as_str())
}

struct Gen<'a> {
    data: &'a [u8],
    at: usize,
    out: Vec<u8>,
    user: Vec<String>,
    /// What must be refused (`module.name`, or the description of a computed callee).
    calls: BTreeSet<String>,
    /// Off-list globals the pickle names.
    named: BTreeSet<String>,
    table: Vec<(&'static str, &'static str)>,
}

impl Gen<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn pick(&mut self) -> (String, String) {
        let b = self.byte();
        if b < 128 {
            let i = (usize::from(b) << 8 | usize::from(self.byte())) % self.table.len();
            let (m, n) = self.table[i];
            (m.to_string(), n.to_string())
        } else {
            let m = MODULES[usize::from(self.byte()) % MODULES.len()];
            let n = NAMES[usize::from(self.byte()) % NAMES.len()];
            (m.to_string(), n.to_string())
        }
    }

    fn user_allows(&self, m: &str, n: &str) -> bool {
        policy::user_allows(m, n, &self.user)
    }

    fn callable(&self, m: &str, n: &str) -> bool {
        let role = policy::classify(m, n).map(|r| r.role);
        matches!(role, Some(Role::Rebuild | Role::Data | Role::TensorType | Role::Reconstruct))
            || self.user_allows(m, n)
    }

    fn instantiable(&self, m: &str, n: &str) -> bool {
        self.callable(m, n) || policy::classify(m, n).is_some_and(|r| r.role == Role::Instance)
    }

    fn has_role(&self, m: &str, n: &str, role: Role) -> bool {
        policy::classify(m, n).is_some_and(|r| r.role == role) || self.user_allows(m, n)
    }

    fn text(&mut self, s: &str) {
        self.out.push(0x8c);
        self.out.push(s.len() as u8);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// Pushes a global by GLOBAL or STACK_GLOBAL, noting it when it is off the list.
    fn global(&mut self, m: &str, n: &str) {
        if policy::classify(m, n).is_none() && !self.user_allows(m, n) {
            self.named.insert(policy::full_name(m, n));
        }
        if self.byte() & 1 == 0 {
            self.out.extend_from_slice(format!("c{m}\n{n}\n").as_bytes());
        } else {
            self.text(m);
            self.text(n);
            self.out.push(0x93);
        }
    }

    fn refuse(&mut self, m: &str, n: &str) {
        self.calls.insert(policy::full_name(m, n));
    }

    /// One value on the stack.
    fn expr(&mut self, depth: u32) {
        let kind = if depth >= 3 || self.done() { 0 } else { self.byte() % 10 };
        match kind {
            1 => {
                let (m, n) = self.pick();
                self.global(&m, &n);
            }
            2 | 3 => self.call(depth),
            4 => {
                // BUILD: on a global (refused unless the user allows it) or on a call's result.
                if self.byte() & 1 == 0 {
                    let (m, n) = self.pick();
                    self.global(&m, &n);
                    if !self.user_allows(&m, &n) {
                        self.refuse(&m, &n);
                    }
                } else {
                    self.call(depth);
                }
                self.out.extend_from_slice(b"}b");
            }
            5 => {
                // A persistent id naming a storage type.
                let (m, n) = self.pick();
                self.out.push(b'(');
                self.text("storage");
                self.global(&m, &n);
                self.text("0");
                self.text("cpu");
                self.out.extend_from_slice(b"K\x01tQ");
                if !self.has_role(&m, &n, Role::Storage) {
                    self.refuse(&m, &n);
                }
            }
            6 => self.reconstruct(),
            7 => {
                // _rebuild_from_type_v2(func, type, (), None)
                let (fm, fname) = self.callee();
                let (tm, tn) = self.pick();
                self.out.extend_from_slice(b"ctorch._tensor\n_rebuild_from_type_v2\n(");
                self.global(&fm, &fname);
                self.global(&tm, &tn);
                self.out.extend_from_slice(b")NtR");
                if !self.has_role(&tm, &tn, Role::TensorType) {
                    self.refuse(&tm, &tn);
                }
                if !self.callable(&fm, &fname) {
                    self.refuse(&fm, &fname);
                }
            }
            8 => {
                // _rebuild_parameter(None, False, {0: hook})
                let (m, n) = self.pick();
                self.out.extend_from_slice(b"ctorch._utils\n_rebuild_parameter\n(N\x89}(K\x00");
                self.global(&m, &n);
                self.out.extend_from_slice(b"utR");
                if !self.user_allows(&m, &n) {
                    self.refuse(&m, &n);
                }
            }
            9 => {
                // Calling a computed value: argparse.Namespace() called again.
                self.out.extend_from_slice(b"cargparse\nNamespace\n)R)R");
                self.calls.insert("<argparse.Namespace object>".into());
            }
            _ => {
                let v = self.byte() % 5;
                self.out.extend_from_slice(match v {
                    0 => b"N".as_slice(),
                    1 => b"K\x07",
                    2 => b"\x8c\x01a",
                    3 => b")",
                    _ => b"}",
                });
            }
        }
    }

    /// A global to call, never one whose arguments the reader interprets.
    fn callee(&mut self) -> (String, String) {
        let (m, n) = self.pick();
        if interprets_args(&m, &n) { ("mypkg.sub".into(), "x".into()) } else { (m, n) }
    }

    fn call(&mut self, depth: u32) {
        let (m, n) = self.callee();
        let shape = self.byte() % 5;
        let argc = self.byte() % 3;
        match shape {
            3 => {
                // INST: MARK args INST module name
                self.out.push(b'(');
                for _ in 0..argc {
                    self.expr(depth + 1);
                }
                if policy::classify(&m, &n).is_none() && !self.user_allows(&m, &n) {
                    self.named.insert(policy::full_name(&m, &n));
                }
                self.out.extend_from_slice(format!("i{m}\n{n}\n").as_bytes());
            }
            4 => {
                // OBJ: MARK class args OBJ
                self.out.push(b'(');
                self.global(&m, &n);
                for _ in 0..argc {
                    self.expr(depth + 1);
                }
                self.out.push(b'o');
            }
            _ => {
                self.global(&m, &n);
                self.out.push(b'(');
                for _ in 0..argc {
                    self.expr(depth + 1);
                }
                self.out.push(b't');
                self.out.extend_from_slice(match shape {
                    0 => b"R".as_slice(),
                    1 => b"\x81",
                    _ => b"}\x92",
                });
            }
        }
        // NEWOBJ and NEWOBJ_EX build with __new__ only: classes allowed just that way pass there, nowhere else.
        let allowed = if matches!(shape, 1 | 2) { self.instantiable(&m, &n) } else { self.callable(&m, &n) };
        if !allowed {
            self.refuse(&m, &n);
        }
    }

    fn reconstruct(&mut self) {
        let (cm, cn) = self.pick();
        let spelling = if self.byte() & 1 == 0 { "copyreg" } else { "copy_reg" };
        if self.byte() & 1 == 0 {
            let (bm, bn) = self.pick();
            self.out.extend_from_slice(format!("c{spelling}\n_reconstructor\n(").as_bytes());
            self.global(&cm, &cn);
            self.global(&bm, &bn);
            self.out.extend_from_slice(b"NtR");
            if !self.callable(&bm, &bn) {
                self.refuse(&bm, &bn);
            }
        } else {
            self.out.extend_from_slice(format!("c{spelling}\n__newobj__\n(").as_bytes());
            self.global(&cm, &cn);
            self.out.extend_from_slice(b"tR");
        }
        if !self.instantiable(&cm, &cn) {
            self.refuse(&cm, &cn);
        }
    }
}

/// Generates a pickle from `data`, parses it, and checks the verdict against the generator's own account.
pub fn pickle_policy(data: &[u8]) {
    let table: Vec<(&str, &str)> =
        policy::RULES.iter().flat_map(|r| r.names.iter().map(move |&n| (r.module, n))).collect();
    let mut g = Gen {
        data,
        at: 0,
        out: vec![0x80, 4, b']', b'('],
        user: Vec::new(),
        calls: BTreeSet::new(),
        named: BTreeSet::new(),
        table,
    };
    for _ in 0..g.byte() % 3 {
        let (m, n) = g.pick();
        g.user.push(policy::full_name(&m, &n));
    }
    let mut exprs = 0;
    while !g.done() && exprs < 64 {
        g.expr(0);
        exprs += 1;
    }
    g.out.extend_from_slice(b"e.");
    let mut input = Input::new("fuzz.pkl", Box::new(g.out.clone()));
    input.allowed_globals = AllowedGlobals::from(g.user.clone());
    let Ok(mut cur) = ByteCursor::new(&input, 0, input.len()) else { return };
    let names = |uses: &[GlobalUse]| uses.iter().map(|u| u.global.clone()).collect::<BTreeSet<_>>();
    match crate::pickle::parse(&mut cur, crate::pickle::Limits::default()) {
        Ok((heap, _)) => {
            assert!(g.calls.is_empty(), "accepted, but these calls must be refused: {:?} in {:?}", g.calls, g.out);
            assert_eq!(names(&heap.named_globals), g.named, "named globals differ in {:?}", g.out);
        }
        Err(e) => match e.kind() {
            ErrorKind::UnsafeGlobal { calls, named } => {
                assert_eq!(names(calls), g.calls, "refused calls differ in {:?}", g.out);
                let expected: BTreeSet<String> = g.named.difference(&g.calls).cloned().collect();
                assert_eq!(names(named), expected, "named globals differ in {:?}", g.out);
            }
            _ => panic!("a well-formed pickle gave {e} ({:?})", g.out),
        },
    }
}

#[cfg(test)]
mod tests {
    /// A few thousand generated pickles in the normal test run (the fuzz target runs millions).
    #[test]
    fn generated_pickles_get_the_generators_verdict() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = (next() % 400) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            super::pickle_policy(&data);
        }
    }
}
