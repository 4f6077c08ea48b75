"""Reading weight files from strangers without running their code.

Every checkpoint this tool reads (eval ``--init``, train-vision ``--init`` and ``--resume``, its own
``checkpoints/latest.pt``) goes through :func:`safe_load`. Pickle is a program, not a data format:
an ordinary unpickler imports whatever global a file names and calls it (``os.system`` via
``__reduce__``). Here one restricted unpickler reads torch zip files, torch's legacy format and plain
pickles alike:

- an explicit allow-list of globals (tensors and their rebuild functions, storages, dtypes, plain
  containers, numbers, strings, NumPy arrays, dtypes and scalars) resolves to the real objects;
- every other global becomes an inert stub class, created here and never imported: a Lightning
  ``AttributeDict`` or an OmegaConf ``DictConfig`` in a checkpoint's hyper-parameters loads as a
  stub holding its state, so the weights beside it are still usable;
- anything that would *call* a global outside the allow-list (``REDUCE``, ``INST``, ``OBJ``), build
  state into something other than a known data type or a stub, or instantiate a non-stub class is
  refused with :class:`UnsafePickleError` naming the global.

``safetensors`` files (no code at all) are read with the safetensors library. TorchScript archives
are refused: they hold code, and a state_dict export is what this tool needs.

Writing goes through :func:`torch_save` (atomic, and the bytes depend on the tensors alone).
"""
from __future__ import annotations

import _compat_pickle
import builtins
import functools
import io
import pickle
import types
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.common import MflagError, atomic_path


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks the unpickler to call or build something outside the allow-list."""

    def __init__(self, what: str, action: str = "call"):
        self.what, self.action = what, action
        super().__init__(f"it would {action} {what} (only tensors, containers, numbers and strings are loaded)")


# --------------------------------------------------------------------------- inert stubs
class _StubMeta(type):
    """Metaclass of the stand-ins for globals outside the allow-list: calling one is refused."""

    def __call__(cls, *args, **kwargs):
        raise UnsafePickleError(cls._mflag_global)


class Stub(metaclass=_StubMeta):
    """An object whose class was not on the allow-list (never imported here). It keeps what the file
    stored for it (``args``, ``state``, ``items``, ``list``) and does nothing else."""

    _mflag_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stub of {self._mflag_global}>"


def _stub_class(module: str, name: str) -> type:
    return _StubMeta(name.rsplit(".", 1)[-1], (Stub,), {"__module__": module, "_mflag_global": f"{module}.{name}"})


# --------------------------------------------------------------------------- the allow-list
def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the encodings they use."""
    if not isinstance(text, str) or str(encoding).lower() not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding)


def _set(items=()):
    """``set`` as protocol-2 pickles build one: from a list (never from a lazy iterable)."""
    if not isinstance(items, (list, tuple)):
        raise UnsafePickleError(f"builtins.set({type(items).__name__})")
    return set(items)


def _frozenset(items=()):
    if not isinstance(items, (list, tuple)):
        raise UnsafePickleError(f"builtins.frozenset({type(items).__name__})")
    return frozenset(items)


def _np_reconstruct(subtype, shape, dtype):
    """NumPy's ``_reconstruct`` as ``ndarray.__reduce__`` emits it: an empty array filled by BUILD."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise UnsafePickleError(f"numpy _reconstruct({subtype!r}, {shape!r})")
    return _NP_RECONSTRUCT(subtype, shape, dtype)


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's rebuild of a tensor with Python attributes: plain tensors and parameters only."""
    rebuild = {id(v) for k, v in _allowed().items() if k.startswith("torch._utils._rebuild")}
    if new_type not in (torch.Tensor, torch.nn.Parameter) or id(func) not in rebuild:
        raise UnsafePickleError(f"torch._tensor._rebuild_from_type_v2({func!r}, {new_type!r})")
    if state and (not isinstance(state, dict) or any(not isinstance(k, str) or k.startswith("__") for k in state)):
        raise UnsafePickleError("torch._tensor._rebuild_from_type_v2 with attributes", "set")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 objects): only an inert stub can be made this way."""
    if isinstance(cls, _StubMeta) and base in (object, dict, list):
        obj = Stub.__new__(cls)
        if state is not None:
            obj.__setstate__(state)
        return obj
    raise UnsafePickleError(f"copyreg._reconstructor({cls!r}, {base!r})")


def _storage_from_bytes(data):
    """``torch.storage._load_from_bytes``: how a plain ``pickle.dump`` of tensors stores their data
    (a small torch file inside the pickle), read back by the same restricted loader."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"torch.storage._load_from_bytes({type(data).__name__})")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                      pickle_module=restricted_pickle_module())


_NP_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_NP_SCALAR = np.float64(0).__reduce__()[0]


@functools.lru_cache(maxsize=1)
def _allowed() -> dict[str, Any]:
    """Global name -> object for everything a weights file may name."""
    u = torch._utils
    # Dense tensors only: sparse and quantized tensors carry invariants a crafted file could break.
    rebuild = (u._rebuild_tensor, u._rebuild_tensor_v2, u._rebuild_tensor_v3, u._rebuild_parameter,
               u._rebuild_parameter_with_state, u._rebuild_device_tensor_from_numpy,
               u._rebuild_device_tensor_from_cpu_tensor, u._rebuild_meta_tensor_no_storage)
    out: dict[str, Any] = {f"torch._utils.{f.__name__}": f for f in rebuild}
    out.update({
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.Size": torch.Size, "torch.device": torch.device, "torch.Tensor": torch.Tensor,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.UntypedStorage": torch.UntypedStorage, "torch.storage.UntypedStorage": torch.UntypedStorage,
        "collections.OrderedDict": OrderedDict, "collections.Counter": Counter,
        "_codecs.encode": _latin1_encode, "copyreg._reconstructor": _reconstructor,
        "torch.storage._load_from_bytes": _storage_from_bytes,
    })
    for name in ("complex", "dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "object"):
        out[f"builtins.{name}"] = getattr(builtins, name)  # types named as data (OmegaConf metadata)
    out["builtins.set"], out["builtins.frozenset"] = _set, _frozenset
    for value in vars(torch).values():  # dtypes, layouts, memory formats, qschemes: plain constants
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)):
            out[f"torch.{str(value).split('.')[-1]}"] = value
    for cls in torch._tensor_classes:
        out[f"{cls.__module__}.{cls.__name__}"] = cls
    # NumPy: arrays, dtypes and scalars under the module names NumPy 1.x and 2.x pickle them with.
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = _np_reconstruct
        out[f"{mod}.scalar"] = _NP_SCALAR
    out["numpy.ndarray"] = np.ndarray
    out["numpy.dtype"] = np.dtype
    for t in set(np.sctypeDict.values()):
        out[f"numpy.{t.__name__}"] = t
        out[f"{type(np.dtype(t)).__module__}.{type(np.dtype(t)).__name__}"] = type(np.dtype(t))
    return out


@functools.lru_cache(maxsize=1)
def _callables() -> frozenset[int]:
    """What REDUCE may call (by identity): functions and constructors that only build data from their
    arguments. Everything else on the allow-list is a value (a type named as data, a dtype)."""
    fns = [v for k, v in _allowed().items() if k.startswith("torch._utils.")]
    fns += [_rebuild_from_type_v2, torch.serialization._get_layout, torch.Size, torch.device, OrderedDict,
            Counter, _latin1_encode, _reconstructor, _storage_from_bytes, _np_reconstruct, _NP_SCALAR, np.dtype,
            _set, _frozenset, complex]
    return frozenset(id(f) for f in fns)


# Types whose instances may receive pickled state (BUILD) or be created by NEWOBJ.
_BUILDABLE = (torch.Tensor, torch.nn.Parameter, OrderedDict, Counter, np.ndarray, np.dtype)
_NEWOBJ = (OrderedDict, Counter)


# --------------------------------------------------------------------------- the unpickler
class RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that can run code routed through the allow-list.
    (The C unpickler's opcodes cannot be overridden; the pickles inside torch zip files are small,
    tensor data is read by torch beside them.)"""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        obj = _allowed().get(f"{module}.{name}")
        if obj is not None:
            return obj
        stubs = self.__dict__.setdefault("_stubs", {})
        if (module, name) not in stubs:
            stubs[(module, name)] = _stub_class(module, name)
        return stubs[(module, name)]

    def _call(self, func: Callable, args: tuple) -> Any:
        if isinstance(func, _StubMeta):
            raise UnsafePickleError(func._mflag_global)
        if id(func) not in _callables():
            raise UnsafePickleError(_name_of(func))
        return func(*args)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs and not isinstance(cls, _StubMeta):
            raise UnsafePickleError(_name_of(cls), "instantiate")
        self.append(self._new(cls, args))

    def _new(self, cls, args):
        if isinstance(cls, _StubMeta):
            return Stub.__new__(cls, *args)
        if cls in _NEWOBJ:
            return cls.__new__(cls, *args)
        raise UnsafePickleError(_name_of(cls), "instantiate")

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1): a call of the class
        self.append(self._call(klass, tuple(args)))

    def load_build(self):
        inst = self.stack[-2]  # below the state
        if isinstance(inst, Stub):
            inst.__setstate__(self.stack.pop())
            return
        if not isinstance(inst, _BUILDABLE):
            raise UnsafePickleError(f"state into {_name_of(inst)}", "write")
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _name_of(obj: Any) -> str:
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
    return repr(obj)[:80]


def restricted_pickle_module() -> types.ModuleType:
    """A module with ``Unpickler`` and ``load`` for ``torch.load(pickle_module=...)``."""
    mod = types.ModuleType("mflag_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


# --------------------------------------------------------------------------- files
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def safe_load(path: str | Path, error: type[MflagError] = MflagError) -> Any:
    """The object stored in ``path`` (torch zip, torch legacy, plain pickle or safetensors), read
    without executing anything from the file. ``error`` (a MflagError subclass) names ``path`` and,
    for a refused file, the global it wanted to call; every other failure (a text file, a truncated
    archive) is also one ``error`` naming the file."""
    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in zf.namelist()):
                    raise error(f"{path}: a TorchScript archive (it holds code); load it in Python and save "
                                "its state_dict() with torch.save to use it here")
            return _torch_load(path)
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="utf-8").load()
        # torch's legacy (pre-1.6) format starts with this pickled magic number; torch reads the rest
        return _torch_load(path) if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC else obj
    except MflagError:
        raise
    except UnsafePickleError as e:
        raise error(f"{path}: refused to load: {e}. A weights file must never run code; only load "
                    f"checkpoints whose origin you know, and export plain state_dicts or safetensors") from e
    except Exception as e:  # a text file, a truncated archive, a damaged pickle: all "not loadable"
        raise error(f"{path}: not a readable checkpoint (torch, pickle or safetensors): "
                    f"{type(e).__name__}: {str(e)[:200]}") from e


def _torch_load(path: Path) -> Any:
    # weights_only=False only hands unpickling to the pickle_module given, the restricted one above:
    # torch's own weights-only loader cannot load Lightning hyper-parameters (refused outright) and
    # this one refuses the same calls while keeping the rest as inert stubs.
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle_module())


def torch_save(obj: Any, path: Path) -> None:
    """Atomic ``torch.save`` (temp file + fsync + rename) whose bytes depend on ``obj`` alone: given a
    file name, torch names the archive's top folder after it (the random temp name here), so identical
    tensors gave different files and eval's checkpoint hash changed; through an open file the folder
    is always ``archive``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)
