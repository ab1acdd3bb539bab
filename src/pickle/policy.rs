//! Which globals a checkpoint's pickle may call: an allowlist, like torch's `weights_only` unpickler, never a
//! denylist (a denylist is bypassed by the next gadget nobody listed).
//!
//! ckptconv executes nothing from a pickle: a call only builds data or an inert record. But a user, a model hub or
//! `torch.load` will act on what the file is, so a file that would call anything but the tensor rebuilds, the
//! containers and the data classes below is refused by name, in the CLI, under WASI and on the page alike. A user
//! who trusts a file allows more with `--allow-global MODULE.NAME` (torch's `add_safe_globals`).
//!
//! One table: each rule names globals, what they are to the reader ([`Role`]) and why they are data.

use std::collections::HashMap;
use std::sync::OnceLock;

/// What an allowlisted global is to the pickle reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Rebuilds a tensor or parameter from a storage (`torch._utils._rebuild_tensor_v2`, ...).
    Rebuild,
    /// A container, scalar or data class: calling it builds a value and nothing else.
    Data,
    /// A tensor class (`torch.Tensor`, `torch.nn.Parameter`, DTensor): may be instantiated and named as the type
    /// of `_rebuild_from_type_v2` or `_rebuild_wrapper_subclass`.
    TensorType,
    /// `copyreg`'s object builders: allowed when the class they build is itself allowed.
    Reconstruct,
    /// A class whose `__init__` does more than store fields (sets up devices, process groups, validation): pickle
    /// may rebuild it with `__new__` and its state (NEWOBJ, copyreg), which is data; a call (REDUCE, INST, OBJ),
    /// which would run `__init__`, is refused.
    Instance,
    /// A storage class, named in a persistent id as the storage's type.
    Storage,
    /// A constant (a dtype, a quantization scheme) or a function a config names: referenced, never called.
    Constant,
}

/// One line of the allowlist.
pub struct Rule {
    /// The module, as the pickle spells it (after Python 2 module renames).
    pub module: &'static str,
    /// The names allowed in it.
    pub names: &'static [&'static str],
    /// What they are.
    pub role: Role,
    /// Why they are data.
    pub why: &'static str,
}

const DTYPES: &[&str] = &[
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "cfloat",
    "cdouble",
    "chalf",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "short",
    "int",
    "long",
    "bool",
    "qint8",
    "qint32",
    "quint8",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "bcomplex32",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
];

const STORAGES: &[&str] = &[
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
    "QInt8Storage",
    "QInt32Storage",
    "QUInt8Storage",
    "QUInt4x2Storage",
    "QUInt2x4Storage",
];

const TENSOR_CLASSES: &[&str] = &[
    "Tensor",
    "FloatTensor",
    "DoubleTensor",
    "HalfTensor",
    "BFloat16Tensor",
    "LongTensor",
    "IntTensor",
    "ShortTensor",
    "CharTensor",
    "ByteTensor",
    "BoolTensor",
];

/// The allowlist. Everything not here is refused when called, and reported when only named.
pub static RULES: &[Rule] = &[
    Rule {
        module: "torch._utils",
        names: &[
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
            "_rebuild_qtensor",
            "_rebuild_sparse_tensor",
            "_rebuild_meta_tensor_no_storage",
            "_rebuild_wrapper_subclass",
            "_rebuild_device_tensor_from_cpu_tensor",
            "_rebuild_device_tensor_from_numpy",
        ],
        role: Role::Rebuild,
        why: "torch's tensor rebuilds (weights_only allows them): a view over a storage, read as data",
    },
    Rule {
        module: "torch._tensor",
        names: &["_rebuild_from_type_v2", "_rebuild_from_type"],
        role: Role::Rebuild,
        why: "a tensor subclass rebuild; its function and type are checked against this list in turn",
    },
    Rule {
        module: "torch",
        names: TENSOR_CLASSES,
        role: Role::TensorType,
        why: "torch's tensor classes (weights_only allows them)",
    },
    Rule {
        module: "torch.nn.parameter",
        names: &["Parameter", "Buffer"],
        role: Role::TensorType,
        why: "a tensor marked as a parameter or buffer",
    },
    Rule {
        module: "torch.distributed.tensor",
        names: &["DTensor"],
        role: Role::TensorType,
        why: "a distributed tensor shard (verl, FSDP2): local tensor plus placement data",
    },
    Rule {
        module: "torch.distributed.tensor._api",
        names: &["DTensor"],
        role: Role::TensorType,
        why: "DTensor under its defining module",
    },
    Rule {
        module: "torch.distributed._tensor.api",
        names: &["DTensor"],
        role: Role::TensorType,
        why: "DTensor under its torch 2.0-2.4 module",
    },
    Rule {
        module: "torch.distributed.tensor._dtensor_spec",
        names: &["DTensorSpec", "TensorMeta", "ShardOrderEntry"],
        role: Role::Data,
        why: "DTensor's placement and shape record",
    },
    Rule {
        module: "torch.distributed._tensor.placement_types",
        names: &["DTensorSpec", "TensorMeta", "Shard", "Replicate", "Partial", "_Partial"],
        role: Role::Data,
        why: "DTensor's placement records under their torch 2.0-2.4 module",
    },
    Rule {
        module: "torch.distributed.tensor.placement_types",
        names: &["Shard", "Replicate", "Partial", "_StridedShard", "_Partial", "MaskPartial"],
        role: Role::Data,
        why: "DTensor placements: which dimension a shard splits",
    },
    Rule {
        module: "torch.distributed._mesh_layout",
        names: &["_MeshLayout", "_FlatLayout"],
        role: Role::Instance,
        why: "a device mesh's shape and strides (torch 2.9+)",
    },
    Rule {
        module: "torch.distributed.device_mesh",
        names: &["DeviceMesh"],
        role: Role::Instance,
        why: "the device grid a DTensor lives on: ranks and names (its __init__ would set up process groups)",
    },
    Rule {
        module: "torch",
        names: STORAGES,
        role: Role::Storage,
        why: "typed storage classes, named in persistent ids to give a storage's dtype",
    },
    Rule {
        module: "torch.storage",
        names: &["UntypedStorage", "TypedStorage"],
        role: Role::Storage,
        why: "storage classes, named in persistent ids",
    },
    Rule {
        module: "torch",
        names: &["UntypedStorage"],
        role: Role::Storage,
        why: "the untyped storage class, named in persistent ids",
    },
    Rule { module: "torch", names: DTYPES, role: Role::Constant, why: "torch dtypes" },
    Rule {
        module: "torch",
        names: &[
            "per_tensor_affine",
            "per_tensor_symmetric",
            "per_channel_affine",
            "per_channel_symmetric",
            "per_channel_affine_float_qparams",
        ],
        role: Role::Constant,
        why: "quantization schemes",
    },
    Rule {
        module: "torch",
        names: &["Size", "device"],
        role: Role::Data,
        why: "a shape tuple and a device name (weights_only allows both)",
    },
    Rule {
        module: "torch.serialization",
        names: &["_get_layout"],
        role: Role::Data,
        why: "turns a layout's name into the layout constant (weights_only allows it)",
    },
    Rule {
        module: "collections",
        names: &["OrderedDict", "Counter", "defaultdict", "deque"],
        role: Role::Data,
        why: "containers; a defaultdict's factory is only named, never called while reading",
    },
    Rule {
        module: "builtins",
        names: &[
            "set",
            "frozenset",
            "bytearray",
            "bytes",
            "complex",
            "dict",
            "list",
            "tuple",
            "slice",
            "range",
            "int",
            "float",
            "str",
            "bool",
            "object",
        ],
        role: Role::Data,
        why: "built-in containers and scalars",
    },
    Rule {
        module: "_codecs",
        names: &["encode"],
        role: Role::Data,
        why: "protocol 2 writes bytes as encode(text, 'latin1')",
    },
    Rule {
        module: "copyreg",
        names: &["_reconstructor", "__newobj__", "__newobj_ex__"],
        role: Role::Reconstruct,
        why: "how pickle rebuilds an instance of a class; the class must be on this list",
    },
    Rule {
        module: "_io",
        names: &["BytesIO"],
        role: Role::Data,
        why: "an in-memory byte buffer (Transformer Engine's _extra_state); touches no file",
    },
    Rule { module: "io", names: &["BytesIO"], role: Role::Data, why: "an in-memory byte buffer" },
    Rule {
        module: "argparse",
        names: &["Namespace"],
        role: Role::Data,
        why: "Megatron's saved command-line arguments",
    },
    Rule {
        module: "torch.distributed.checkpoint.metadata",
        names: &[
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        ],
        role: Role::Data,
        why: "torch.distributed.checkpoint's .metadata records: names, shapes, chunk offsets",
    },
    Rule {
        module: "torch.distributed.checkpoint.filesystem",
        names: &["_StorageInfo"],
        role: Role::Data,
        why: "where a DCP item lives: file, offset, length, transforms",
    },
    Rule {
        module: "torch.distributed.checkpoint.planner",
        names: &[
            "LoadItemType",
            "WriteItemType",
            "SavePlan",
            "LoadPlan",
            "WriteItem",
            "ReadItem",
            "TensorWriteData",
            "BytesIOWriteData",
        ],
        role: Role::Data,
        why: "DCP save-plan records (Megatron's torch_dist keeps them in .metadata): item kinds, indexes, shapes",
    },
    Rule {
        module: "megatron.core.enums",
        names: &["ModelType", "Fp8Recipe"],
        role: Role::Data,
        why: "enums in Megatron's saved arguments",
    },
    Rule {
        module: "megatron.core.transformer.enums",
        names: &["AttnBackend", "AttnMaskType", "AttnType", "LayerType", "ModelType"],
        role: Role::Data,
        why: "enums in Megatron's saved arguments",
    },
    Rule {
        module: "megatron.core.model_parallel_config",
        names: &["ModelParallelConfig"],
        role: Role::Instance,
        why: "Megatron's parallelism settings dataclass (its __post_init__ validates)",
    },
    Rule {
        module: "megatron.core.transformer.transformer_config",
        names: &["TransformerConfig", "MLATransformerConfig"],
        role: Role::Instance,
        why: "Megatron's model settings dataclass (its __post_init__ validates and may import kernels)",
    },
    Rule {
        module: "deepspeed.runtime.zero.config",
        names: &["ZeroStageEnum"],
        role: Role::Data,
        why: "DeepSpeed's ZeRO stage enum in its optimizer states",
    },
    Rule {
        module: "deepspeed.utils.tensor_fragment",
        names: &["fragment_address"],
        role: Role::Data,
        why: "DeepSpeed's record of where a parameter's fragment sits in a flat buffer (numel, start)",
    },
    Rule {
        module: "deepspeed.runtime.fp16.loss_scaler",
        names: &["LossScaler", "DynamicLossScaler"],
        role: Role::Instance,
        why: "DeepSpeed's loss scale state in its optimizer states: numbers",
    },
    Rule {
        module: "transformers.training_args",
        names: &["TrainingArguments", "Seq2SeqTrainingArguments"],
        role: Role::Instance,
        why: "the Trainer's training_args.bin (its __post_init__ sets up devices)",
    },
    Rule {
        module: "transformers.training_args",
        names: &["OptimizerNames"],
        role: Role::Data,
        why: "an enum in TrainingArguments",
    },
    Rule {
        module: "transformers.trainer_utils",
        names: &["IntervalStrategy", "SaveStrategy", "SchedulerType", "HubStrategy", "FSDPOption"],
        role: Role::Data,
        why: "enums in TrainingArguments",
    },
    Rule {
        module: "transformers.trainer_pt_utils",
        names: &["AcceleratorConfig"],
        role: Role::Instance,
        why: "a dataclass of settings in TrainingArguments",
    },
    Rule {
        module: "transformers.debug_utils",
        names: &["DebugOption"],
        role: Role::Data,
        why: "an enum in TrainingArguments",
    },
    Rule {
        module: "accelerate.state",
        names: &["PartialState", "AcceleratorState"],
        role: Role::Instance,
        why: "accelerate's process state held by TrainingArguments (its __init__ would set up distributed runs)",
    },
    Rule {
        module: "accelerate.utils.dataclasses",
        names: &["DistributedType"],
        role: Role::Data,
        why: "an enum in accelerate's state",
    },
    Rule {
        module: "torch.nn.functional",
        names: &["gelu", "silu", "relu", "sigmoid", "tanh", "softmax", "squared_relu"],
        role: Role::Constant,
        why: "activation functions a Megatron config names; named, never called while reading",
    },
    Rule {
        module: "torch.nn.init",
        names: &["normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "zeros_"],
        role: Role::Constant,
        why: "init functions a config names; named, never called while reading",
    },
    Rule {
        module: "numpy.core.multiarray",
        names: &["scalar", "_reconstruct"],
        role: Role::Data,
        why: "numpy scalars and arrays (RNG states, step counters)",
    },
    Rule {
        module: "numpy._core.multiarray",
        names: &["scalar", "_reconstruct"],
        role: Role::Data,
        why: "numpy scalars and arrays under numpy 2's module",
    },
    Rule { module: "numpy", names: &["ndarray", "dtype"], role: Role::Data, why: "numpy arrays and dtypes" },
    Rule {
        module: "numpy.dtypes",
        names: &[
            "Float16DType",
            "Float32DType",
            "Float64DType",
            "Int8DType",
            "Int16DType",
            "Int32DType",
            "Int64DType",
            "UInt8DType",
            "UInt16DType",
            "UInt32DType",
            "UInt64DType",
            "BoolDType",
            "BytesDType",
            "StrDType",
            "ObjectDType",
        ],
        role: Role::Data,
        why: "numpy 2 dtype classes",
    },
    Rule {
        module: "datetime",
        names: &["datetime", "date", "time", "timedelta", "timezone"],
        role: Role::Data,
        why: "timestamps in training states",
    },
    Rule {
        module: "pathlib",
        names: &["Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"],
        role: Role::Data,
        why: "paths in saved arguments; building one touches no file",
    },
    Rule {
        module: "omegaconf.dictconfig",
        names: &["DictConfig"],
        role: Role::Data,
        why: "omegaconf configs saved with a checkpoint (NeMo, verl)",
    },
    Rule { module: "omegaconf.listconfig", names: &["ListConfig"], role: Role::Data, why: "omegaconf lists" },
    Rule {
        module: "omegaconf.base",
        names: &["ContainerMetadata", "Metadata"],
        role: Role::Data,
        why: "omegaconf's per-node metadata",
    },
    Rule {
        module: "omegaconf.nodes",
        names: &["AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "BytesNode"],
        role: Role::Data,
        why: "omegaconf's value nodes",
    },
    Rule { module: "typing", names: &["Any"], role: Role::Constant, why: "omegaconf's element type marker" },
];

/// Python 2 module names pickles may carry, as Python 3 reads them (`_compat_pickle.IMPORT_MAPPING`), for the
/// modules this list names.
fn python3_module(module: &str) -> &str {
    match module {
        "__builtin__" => "builtins",
        "copy_reg" => "copyreg",
        other => other,
    }
}

type Index = HashMap<&'static str, HashMap<&'static str, &'static Rule>>;

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut by_module: Index = HashMap::new();
        for rule in RULES {
            let names = by_module.entry(rule.module).or_default();
            for &n in rule.names {
                names.insert(n, rule);
            }
        }
        by_module
    })
}

/// The rule that allows `module.name`, if any.
pub fn classify(module: &str, name: &str) -> Option<&'static Rule> {
    index().get(python3_module(module))?.get(name).copied()
}

/// `module.name` as the allowlist and messages spell it (Python 2 module names in Python 3 spelling).
pub fn full_name(module: &str, name: &str) -> String {
    format!("{}.{name}", python3_module(module))
}

/// Whether a call of `module.name` is allowed: on the list as something callable, or allowed by the user.
pub fn callable(module: &str, name: &str, user: &[String]) -> bool {
    let allowed = classify(module, name)
        .is_some_and(|r| matches!(r.role, Role::Rebuild | Role::Data | Role::TensorType | Role::Reconstruct));
    allowed || user_allows(module, name, user)
}

/// Checks one `--allow-global` value: `module.name`, as a pickle's GLOBAL would spell it.
pub fn parse_allowed(s: &str) -> Result<String, String> {
    if crate::error::is_dotted_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not MODULE.NAME (e.g. mypkg.config.TrainConfig)"))
    }
}

/// Whether building an instance of `module.name` with `__new__` and its state is allowed: anything callable, and the
/// classes allowed only that way ([`Role::Instance`]).
pub fn instantiable(module: &str, name: &str, user: &[String]) -> bool {
    callable(module, name, user) || classify(module, name).is_some_and(|r| r.role == Role::Instance)
}

/// Whether the user allowed `module.name` (`--allow-global`).
pub fn user_allows(module: &str, name: &str, user: &[String]) -> bool {
    !user.is_empty() && {
        let full = full_name(module, name);
        user.contains(&full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, GlobalUse};
    use crate::io::{ByteCursor, Input};
    use crate::pickle::{Heap, Id, Limits, Node, parse};

    fn run_allowing(bytes: &[u8], allow: &[&str]) -> crate::Result<(Heap, Id)> {
        let mut input = Input::new("t.pkl", Box::new(bytes.to_vec()));
        input.allowed_globals = allow.iter().map(|s| s.to_string()).collect::<Vec<_>>().into();
        let mut cur = ByteCursor::new(&input, 0, input.len())?;
        parse(&mut cur, Limits::default())
    }

    /// The refused calls and the globals named without a call, as (global, how) and global.
    fn refusal(bytes: &[u8]) -> (Vec<(String, String)>, Vec<String>) {
        let e = run_allowing(bytes, &[]).expect_err("the pickle should be refused");
        assert_eq!(e.file(), Some("t.pkl"));
        match e.kind() {
            ErrorKind::UnsafeGlobal { calls, named } => (
                calls.iter().map(|u| (u.global.clone(), u.how.clone())).collect(),
                named.iter().map(|u: &GlobalUse| u.global.clone()).collect(),
            ),
            other => panic!("not an unsafe-global refusal: {other:?}"),
        }
    }

    fn calls(bytes: &[u8]) -> Vec<(String, String)> {
        refusal(bytes).0
    }

    fn pair(g: &str, how: &str) -> (String, String) {
        (g.to_string(), how.to_string())
    }

    #[test]
    fn a_call_off_the_list_is_refused_with_its_place_and_how_to_proceed() {
        let e = run_allowing(b"cos\nsystem\n(Vecho pwned\ntR.", &[]).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("t.pkl: refused: the pickle would call a global"), "{text}");
        assert!(text.contains("os.system (called by REDUCE, pickle byte 25)"), "{text}");
        assert!(text.contains("--allow-global os.system"), "{text}");
        assert_eq!(e.label(), "unsafe-global");
    }

    #[test]
    fn every_call_shape_is_checked() {
        // REDUCE, NEWOBJ, NEWOBJ_EX, INST and OBJ of a class off the list.
        assert_eq!(calls(b"\x80\x02csubprocess\nPopen\n)\x81."), [pair("subprocess.Popen", "instantiated by NEWOBJ")]);
        assert_eq!(
            calls(b"\x80\x04csubprocess\nPopen\n)}\x92."),
            [pair("subprocess.Popen", "instantiated by NEWOBJ_EX")]
        );
        assert_eq!(calls(b"(isubprocess\nPopen\n."), [pair("subprocess.Popen", "instantiated by INST")]);
        assert_eq!(calls(b"(csubprocess\nPopen\no."), [pair("subprocess.Popen", "instantiated by OBJ")]);
        // A class with a working __init__ may be rebuilt with NEWOBJ (its __new__ and state), never called.
        assert!(run_allowing(b"\x80\x02ctorch.distributed.device_mesh\nDeviceMesh\n)\x81}b.", &[]).is_ok());
        assert_eq!(
            calls(b"ctorch.distributed.device_mesh\nDeviceMesh\n(Vcpu\ntR."),
            [pair(
                "torch.distributed.device_mesh.DeviceMesh",
                "called by REDUCE, which runs its __init__; only NEWOBJ rebuilds it as data"
            )]
        );
        // BUILD with state on a module object rebinds its functions.
        assert_eq!(calls(b"cos\npath\n}b."), [pair("os.path", "its attributes set by BUILD")]);
        // Calling what another call returned.
        assert_eq!(calls(b"cargparse\nNamespace\n)R)R."), [pair("<argparse.Namespace object>", "called by REDUCE")]);
    }

    #[test]
    fn indirect_routes_name_the_global_behind_them() {
        // copyreg._reconstructor(subprocess.Popen, object, None): allowed builder, refused class.
        let p = b"ccopy_reg\n_reconstructor\n(csubprocess\nPopen\nc__builtin__\nobject\nNtR.";
        assert_eq!(calls(p), [pair("subprocess.Popen", "class given to copyreg._reconstructor")]);
        // list(map(os.system, ['id'])): os.system is only named; map is the call.
        let p = b"c__builtin__\nlist\n(c__builtin__\nmap\n(cos\nsystem\n(Vid\nltRtR.";
        let (made, named) = refusal(p);
        assert_eq!(made, [pair("builtins.map", "called by REDUCE")]);
        assert_eq!(named, ["os.system"]);
        // numpy's _reconstruct(cls, shape, dtype) builds its class.
        let p = b"cnumpy.core.multiarray\n_reconstruct\n(cos\nsystem\n(K\x00tC\x01btR.";
        assert_eq!(calls(p), [pair("os.system", "class given to numpy's _reconstruct")]);
        // _rebuild_from_type_v2(func, type, args, state): both func and type are checked.
        let p = b"ctorch._tensor\n_rebuild_from_type_v2\n(cos\nsystem\ncpydoc\nlocate\n(Vid\ntNtR.";
        assert_eq!(
            calls(p),
            [
                pair("pydoc.locate", "tensor type given to _rebuild_from_type_v2"),
                pair("os.system", "function called by _rebuild_from_type_v2")
            ]
        );
    }

    #[test]
    fn storage_types_and_hooks_are_checked() {
        // A persistent id naming a class that is not a storage.
        let p = b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ.";
        assert_eq!(calls(p), [pair("os.system", "used as a storage type")]);
        // _rebuild_parameter(data, requires_grad, hooks) with a hook.
        let p =
            b"\x80\x02ctorch._utils\n_rebuild_parameter\n(N\x89ccollections\nOrderedDict\n)R(K\x00cos\nsystem\nutR.";
        assert_eq!(calls(p), [pair("os.system", "used as a backward hook")]);
    }

    #[test]
    fn every_refused_global_is_named_once_even_after_a_later_error() {
        // Two refused globals, one of them twice, then a malformed stream (no STOP).
        let p = b"cos\nsystem\n(Va\ntRcos\nsystem\n(Vb\ntRcbuiltins\neval\n(Vc\ntR";
        assert_eq!(calls(p), [pair("os.system", "called by REDUCE"), pair("builtins.eval", "called by REDUCE")]);
    }

    #[test]
    fn a_stream_that_breaks_off_still_says_what_it_names() {
        // picklescan's broken_model.pkl: GLOBAL builtins.exec, then a BINUNICODE whose length runs past the end.
        let e = run_allowing(b"cbuiltins\nexec\n(X>\nf = open('x')", &[]).unwrap_err();
        assert_eq!(e.label(), "truncated");
        assert!(e.to_string().ends_with("; before that, it names builtins.exec, off ckptconv's allowlist"), "{e}");
    }

    #[test]
    fn the_user_can_allow_a_global_and_names_without_calls_are_kept() {
        let p = b"cmypkg.config\nTrainConfig\n)R.";
        assert_eq!(calls(p), [pair("mypkg.config.TrainConfig", "called by REDUCE")]);
        let (heap, root) = run_allowing(p, &["mypkg.config.TrainConfig"]).unwrap();
        assert_eq!(heap.describe(root), "<mypkg.config.TrainConfig object>");
        assert!(heap.named_globals.is_empty());
        // Named only (a config naming a function): parsed, and reported.
        let (heap, _) = run_allowing(b"}(Vact\ncmypkg.acts\nswish\nu.", &[]).unwrap();
        let named: Vec<&str> = heap.named_globals.iter().map(|u| u.global.as_str()).collect();
        assert_eq!(named, ["mypkg.acts.swish"]);
        assert!(matches!(heap.get(root_of(&heap)), Node::Dict(_)));
    }

    fn root_of(heap: &Heap) -> Id {
        (0..heap.len() as Id).find(|&i| matches!(heap.get(i), Node::Dict(_))).unwrap()
    }

    #[test]
    fn allow_global_values_are_checked() {
        assert!(parse_allowed("mypkg.config.TrainConfig").is_ok());
        for bad in ["os", "os.", ".system", "os system", "os.sys tem", ""] {
            assert!(parse_allowed(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_rule_explains_itself_and_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for r in RULES {
            assert!(!r.why.is_empty() && !r.names.is_empty(), "{}", r.module);
            for n in r.names {
                assert!(seen.insert((r.module, *n)), "{}.{n} is listed twice", r.module);
            }
        }
    }

    #[test]
    fn code_runners_are_not_callable() {
        for (m, n) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("builtins", "getattr"),
            ("builtins", "map"),
            ("subprocess", "Popen"),
            ("_functools", "partial"),
            ("torch", "load"),
            ("torch.storage", "_load_from_bytes"),
            ("pydoc", "locate"),
            ("torch", "float32"),
            ("torch", "FloatStorage"),
        ] {
            assert!(!callable(m, n, &[]), "{m}.{n}");
        }
        assert!(callable("__builtin__", "set", &[]));
        assert!(callable("copy_reg", "_reconstructor", &[]));
        assert!(callable("os", "system", &["os.system".to_string()]));
    }
}
