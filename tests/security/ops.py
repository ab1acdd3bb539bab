"""Hand-written pickle opcodes for the security corpus (tests/security/gadgets.py, tests/security/fetch_corpora.py).

Owns: tests/security/ops.py. Each helper returns the bytes of an opcode sequence whose net effect is to push one value
(a call's result, a global, a constant), so sequences compose like expressions:

    call(glob("os", "system"), s("touch PWNED"))      # os.system('touch PWNED') via GLOBAL, MARK, TUPLE, REDUCE

and `Raw(ops)` puts such a sequence into an object that torch.save (or pickle) writes verbatim at its place in a
real checkpoint (`inject_module()` is the `pickle_module=` that does it). Nothing here unpickles anything.
"""

import pickle
import struct
import types

MARKER = "PWNED"  # what every live payload creates in the loader's working folder
SHELL = f"touch {MARKER}"  # the shell form
PYCODE = f"open({MARKER!r}, 'w').close()"  # the Python form


def s(text):
    """A str (BINUNICODE)."""
    b = text.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def by(data):
    """A bytes object (BINBYTES)."""
    return pickle.BINBYTES + struct.pack("<I", len(data)) + data


def i(n):
    return pickle.BININT + struct.pack("<i", n)


TRUE, FALSE, NONE = pickle.NEWTRUE, pickle.NEWFALSE, pickle.NONE


def glob(module, name):
    """GLOBAL 'module name' (protocol 0 form, still read by every unpickler)."""
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def sglob(module, name):
    """STACK_GLOBAL from two strings (protocol 4 form; `name` may be dotted)."""
    return s(module) + s(name) + pickle.STACK_GLOBAL


def tup(*items):
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def lst(*items):
    return pickle.MARK + b"".join(items) + pickle.LIST


def dct(**items):
    return pickle.MARK + b"".join(s(k) + v for k, v in items.items()) + pickle.DICT


def call(fn, *args):
    """fn(*args) with REDUCE."""
    return fn + tup(*args) + pickle.REDUCE


def seq(*exprs):
    """Evaluate each expression for its effect, keep the last one's value (POP the others)."""
    return b"".join(e + pickle.POP for e in exprs[:-1]) + exprs[-1]


def whole(expr, proto=2):
    """A complete pickle whose result is `expr`."""
    return pickle.PROTO + bytes([proto]) + expr + pickle.STOP


class Raw:
    """Written verbatim by the injecting pickler: `ops` must push exactly one value and use no memo."""

    def __init__(self, ops):
        self.ops = ops

    def __reduce__(self):  # pickled by a normal pickler it would be silently wrong: refuse instead
        raise TypeError("Raw opcodes need inject_module() as torch.save's pickle_module")


class InjectingPickler(pickle._Pickler):
    """The pure-Python pickler, writing `Raw` objects' opcodes in place and asking `reducer_override` first."""

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Raw):
            self.write(obj.ops)
            return
        super().save(obj, save_persistent_id)


def inject_module(reducer_override=None):
    """A module for torch.save(..., pickle_module=) (or direct use) that pickles with InjectingPickler."""
    mod = types.ModuleType("ckptconv_inject")

    class P(InjectingPickler):
        pass

    if reducer_override is not None:
        P.reducer_override = lambda self, obj: reducer_override(obj)

    def dump(obj, f, protocol=2, **kw):
        P(f, protocol).dump(obj)

    def dumps(obj, protocol=2):
        import io

        buf = io.BytesIO()
        dump(obj, buf, protocol)
        return buf.getvalue()

    mod.Pickler, mod.dump, mod.dumps = P, dump, dumps
    mod.Unpickler, mod.load, mod.loads = pickle.Unpickler, pickle.load, pickle.loads
    return mod
