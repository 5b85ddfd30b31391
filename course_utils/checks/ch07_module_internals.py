"""Check batteries of chapter 07: nn.Module rebuilt as MiniModule, in four stages.

Each exercise receives a class (not a function). The learner builds it in stages, each
stage a subclass of the one before:

- ``MiniModule``: registration (``__setattr__``/``__getattr__``/``__delattr__`` routing into
  ``_parameters``, ``_buffers``, ``_non_persistent_buffers_set`` and ``_modules``, the
  ``register_*`` methods and ``add_module``);
- ``MiniModuleTraversal``: the generators (``named_parameters`` ... ``named_modules``),
  ``apply``, ``train``/``eval``, ``zero_grad`` and ``to(dtype)``;
- ``MiniModuleState``: ``state_dict`` and ``load_state_dict``;
- ``MiniModuleHooks``: ``__call__`` with forward pre-hooks, forward hooks and handles.

A battery builds the same small models twice, once on the learner's class and once on
``torch.nn.Module`` (identical code, identical numbers), runs the same operations on both
and compares what comes back: names in order, the objects behind them, training flags,
state-dict keys and values, missing/unexpected keys, the kind of exception raised, the
order in which hooks run and what their return values do. Everything is deterministic:
there is nothing random to judge.
"""

from __future__ import annotations

import copy
import itertools
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import nn

from ..checking import CheckFailure, Tester, _Pending, exercise

CHAPTER = "07_module_internals"
Tensor = torch.Tensor
F64 = torch.float64


# =====================================================================================
# The reference: one class with every stage
# =====================================================================================
class IncompatibleKeys(NamedTuple):
    """What load_state_dict returns: the keys it could not fill and the keys it did not use."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class RemovableHandle:
    """Returned by the register_*_hook methods; ``remove()`` unregisters the hook."""

    def __init__(self, table: dict[int, Callable[..., Any]], key: int) -> None:
        self.table = table
        self.key = key

    def remove(self) -> None:
        """Unregister the hook (a second call does nothing)."""
        self.table.pop(self.key, None)


_HOOK_IDS = itertools.count()


class RefMiniModule:
    """The course's MiniModule: nn.Module's registration, traversal, state dict and hooks."""

    def __init__(self) -> None:
        # object.__setattr__: our own __setattr__ needs these tables to exist already.
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent_buffers_set", set())
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_forward_pre_hooks", {})
        object.__setattr__(self, "_forward_hooks", {})

    # ---- stage 1: registration ----------------------------------------------------------
    def _forget(self, name: str, *tables: Any) -> None:
        for table in tables:
            if name in table:
                del table[name]
        self._non_persistent_buffers_set.discard(name)

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        params = d.get("_parameters")
        if isinstance(value, nn.Parameter):
            if params is None:
                raise AttributeError("cannot assign parameters before __init__() call")
            self._forget(name, d, self._buffers, self._modules)
            self.register_parameter(name, value)
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r}")
            params[name] = None
        elif isinstance(value, RefMiniModule):
            if "_modules" not in d:
                raise AttributeError("cannot assign module before __init__() call")
            self._forget(name, d, self._parameters, self._buffers)
            self._modules[name] = value
        elif "_modules" in d and name in d["_modules"]:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r}")
            self._modules[name] = None
        elif "_buffers" in d and name in d["_buffers"]:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r}")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup failed; read the tables through __dict__ so that a
        # half-built object (before __init__, inside copy.deepcopy) cannot recurse forever.
        d = self.__dict__
        for table in ("_parameters", "_buffers", "_modules"):
            if table in d and name in d[table]:
                return d[table][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._buffers:
            del self._buffers[name]
            self._non_persistent_buffers_set.discard(name)
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    def _check_name(self, name: Any, table: str) -> None:
        if table not in self.__dict__:
            raise AttributeError(f"cannot register into {table} before __init__() call")
        if not isinstance(name, str):
            raise TypeError(f"name should be a str, got {type(name).__name__}")
        if "." in name:
            raise KeyError(f'name cannot contain ".", got {name!r}')
        if name == "":
            raise KeyError('name cannot be the empty string ""')
        if hasattr(self, name) and name not in self.__dict__[table]:
            raise KeyError(f"attribute {name!r} already exists")

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Add a parameter (or a None placeholder) under ``name``."""
        self._check_name(name, "_parameters")
        if param is not None and not isinstance(param, nn.Parameter):
            raise TypeError(f"cannot assign {type(param).__name__} as parameter {name!r}")
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Add a buffer: a tensor that is state but not a parameter."""
        self._check_name(name, "_buffers")
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"cannot assign {type(tensor).__name__} as buffer {name!r}")
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def add_module(self, name: str, module: RefMiniModule | None) -> None:
        """Add a child module (or a None placeholder) under ``name``."""
        if module is not None and not isinstance(module, RefMiniModule):
            raise TypeError(f"{type(module).__name__} is not a MiniModule")
        self._check_name(name, "_modules")
        self._modules[name] = module

    # ---- stage 2: traversal -------------------------------------------------------------
    def named_modules(
        self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True
    ) -> Iterator[tuple[str, RefMiniModule]]:
        """Pre-order walk: (dotted name, module), each module once unless remove_duplicate=False."""
        if memo is None:
            memo = set()
        if self in memo:
            return
        if remove_duplicate:
            memo.add(self)
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None:
                child = f"{prefix}.{name}" if prefix else name
                yield from module.named_modules(memo, child, remove_duplicate)

    def _named_members(
        self, table: str, prefix: str, recurse: bool, remove_duplicate: bool
    ) -> Iterator[tuple[str, Tensor]]:
        seen: set = set()
        walk = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for module_prefix, module in walk:
            for name, value in module.__dict__[table].items():
                if value is None or value in seen:
                    continue
                if remove_duplicate:
                    seen.add(value)
                yield (f"{module_prefix}.{name}" if module_prefix else name), value

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """(dotted name, parameter) pairs, each parameter object once."""
        yield from self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of named_parameters, without names."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """(dotted name, buffer) pairs, persistent or not, each buffer object once."""
        yield from self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        """The buffers of named_buffers, without names."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def named_children(self) -> Iterator[tuple[str, RefMiniModule]]:
        """Direct children, each module object once, None placeholders skipped."""
        seen: set = set()
        for name, module in self._modules.items():
            if module is not None and module not in seen:
                seen.add(module)
                yield name, module

    def children(self) -> Iterator[RefMiniModule]:
        """The modules of named_children."""
        for _, m in self.named_children():
            yield m

    def modules(self) -> Iterator[RefMiniModule]:
        """The modules of named_modules."""
        for _, m in self.named_modules():
            yield m

    def apply(self, fn: Callable[[RefMiniModule], Any]) -> RefMiniModule:
        """Call fn on every child (recursively) and then on self; return self."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    def train(self, mode: bool = True) -> RefMiniModule:
        """Set the training flag of self and every descendant; return self."""
        self.training = mode
        for module in self.children():
            module.train(mode)
        return self

    def eval(self) -> RefMiniModule:
        """train(False)."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset every parameter's .grad: to None, or to zeros in place."""
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    def to(self, dtype: torch.dtype) -> RefMiniModule:
        """Convert floating-point parameters (in place, same objects) and buffers to dtype."""
        for module in self.modules():
            for p in module._parameters.values():
                if p is not None and p.is_floating_point():
                    p.data = p.data.to(dtype)
            for name, b in module._buffers.items():
                if b is not None and b.is_floating_point():
                    module._buffers[name] = b.to(dtype)
        return self

    # ---- stage 3: state dict ------------------------------------------------------------
    def state_dict(
        self, *, destination: dict | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Tensor]:
        """Parameters and persistent buffers by dotted name, detached; shared ones under every name."""
        if destination is None:
            destination = OrderedDict()
        for name, p in self._parameters.items():
            if p is not None:
                destination[prefix + name] = p if keep_vars else p.detach()
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = b if keep_vars else b.detach()
        for name, module in self._modules.items():
            if module is not None:
                module.state_dict(
                    destination=destination, prefix=f"{prefix}{name}.", keep_vars=keep_vars
                )
        return destination

    def load_state_dict(
        self, state_dict: dict[str, Tensor], strict: bool = True
    ) -> IncompatibleKeys:
        """Copy tensors into the existing parameters and buffers; report missing and unexpected keys."""
        missing: list[str] = []
        unexpected: list[str] = []
        errors: list[str] = []

        def load(module: RefMiniModule, sd: dict[str, Tensor], prefix: str) -> None:
            local = {k: v for k, v in module._parameters.items() if v is not None}
            local.update(
                (k, v)
                for k, v in module._buffers.items()
                if v is not None and k not in module._non_persistent_buffers_set
            )
            for name, tensor in local.items():
                key = prefix + name
                if key not in sd:
                    missing.append(key)
                    continue
                value = sd[key]
                if value.shape != tensor.shape:
                    errors.append(
                        f"size mismatch for {key}: the checkpoint has shape {tuple(value.shape)}, "
                        f"the model {tuple(tensor.shape)}."
                    )
                    continue
                with torch.no_grad():
                    tensor.copy_(value)
            for key in sd:
                head, *rest = key[len(prefix) :].split(".", 1)
                if (head not in module._modules) if rest else (head not in local):
                    unexpected.append(key)
            for name, child in module._modules.items():
                if child is not None:
                    child_prefix = f"{prefix}{name}."
                    load(
                        child,
                        {k: v for k, v in sd.items() if k.startswith(child_prefix)},
                        child_prefix,
                    )

        load(self, dict(state_dict), "")
        if strict and unexpected:
            errors.insert(
                0, "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected)
            )
        if strict and missing:
            errors.insert(
                0, "Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing)
            )
        if errors:
            raise RuntimeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: " + "; ".join(errors)
            )
        return IncompatibleKeys(missing, unexpected)

    # ---- stage 4: hooks -----------------------------------------------------------------
    def register_forward_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """hook(module, args) runs before forward; a non-None result replaces args."""
        key = next(_HOOK_IDS)
        self._forward_pre_hooks[key] = hook
        return RemovableHandle(self._forward_pre_hooks, key)

    def register_forward_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """hook(module, args, output) runs after forward; a non-None result replaces output."""
        key = next(_HOOK_IDS)
        self._forward_hooks[key] = hook
        return RemovableHandle(self._forward_hooks, key)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for hook in list(self._forward_pre_hooks.values()):
            result = hook(self, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
        output = self.forward(*args, **kwargs)
        for hook in list(self._forward_hooks.values()):
            result = hook(self, args, output)
            if result is not None:
                output = result
        return output


# =====================================================================================
# The model zoo, built on any base class (the learner's or nn.Module)
# =====================================================================================
def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _zoo(base: type) -> SimpleNamespace:
    """The battery's models as subclasses of ``base``; the same code for both twins."""

    class Leaf(base):
        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

    class Linear(base):
        def __init__(self, n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> None:
            super().__init__()
            self.weight = nn.Parameter(_randn(seed, n_out, n_in) / n_in**0.5)
            if bias:
                self.bias = nn.Parameter(_randn(seed + 100, n_out))
            else:
                self.register_parameter("bias", None)

        def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
            y = x @ self.weight.T
            return scale * (y if self.bias is None else y + self.bias)

    class Tanh(base):
        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(x)

    class Norm(base):
        def __init__(self, n: int, seed: int = 0) -> None:
            super().__init__()
            self.gain = nn.Parameter(1.0 + 0.1 * _randn(seed, n))
            self.register_buffer("running_mean", 0.1 * _randn(seed + 1, n))
            self.register_buffer("steps", torch.tensor(3))
            self.register_buffer("scratch", torch.zeros(n, dtype=F64), persistent=False)

        def forward(self, x: Tensor) -> Tensor:
            return (x - self.running_mean) * self.gain

    class Seq(base):
        def __init__(self, *layers: Any) -> None:
            super().__init__()
            for i, layer in enumerate(layers):
                self.add_module(str(i), layer)

        def forward(self, x: Tensor) -> Tensor:
            for layer in self.__dict__["_modules"].values():
                x = layer(x)
            return x

    class Embedding(base):
        def __init__(self, num: int, dim: int, seed: int = 0) -> None:
            super().__init__()
            self.weight = nn.Parameter(_randn(seed, num, dim))

        def forward(self, ids: Tensor) -> Tensor:
            return self.weight[ids]

    class Block(base):
        def __init__(self, d: int, seed: int = 0) -> None:
            super().__init__()
            self.fc = Linear(d, d, seed=seed)
            self.norm = Norm(d, seed=seed + 1)

        def forward(self, x: Tensor) -> Tensor:
            return x + torch.tanh(self.norm(self.fc(x)))

    class Net(base):
        """embed -> block -> the same block again -> head, whose weight is embed's (tied)."""

        def __init__(self, seed: int = 0) -> None:
            super().__init__()
            self.embed = Embedding(5, 4, seed=seed + 1)
            self.block = Block(4, seed=seed + 2)
            self.again = self.block
            self.add_module("skip", None)
            self.head = Linear(4, 5, bias=False, seed=seed + 4)
            self.head.weight = self.embed.weight
            self.temperature = nn.Parameter(torch.tensor(0.5 + seed, dtype=F64))
            self.cache = torch.zeros(2)  # a plain tensor attribute: not a buffer
            self.label = "net"

        def forward(self, ids: Tensor) -> Tensor:
            h = self.again(self.block(self.embed(ids)))
            return self.head(h) / self.temperature

    def deep(seed: int = 0) -> Any:
        return Seq(
            Seq(Linear(3, 4, seed=seed), Tanh()),
            Norm(4, seed=seed + 1),
            Linear(4, 2, bias=False, seed=seed + 2),
        )

    return SimpleNamespace(
        Leaf=Leaf, Linear=Linear, Tanh=Tanh, Norm=Norm, Seq=Seq, Block=Block, Net=Net, deep=deep
    )


_TORCH = _zoo(nn.Module)

#: The models every stage-2/3 battery builds: (description, builder of the zoo)
MODELS: list[tuple[str, Callable[[SimpleNamespace], Any]]] = [
    ("Linear(3, 2)", lambda z: z.Linear(3, 2, seed=3)),
    ("Block(4): fc, norm (with a non-persistent buffer)", lambda z: z.Block(4, seed=5)),
    ("Seq(Seq(Linear, Tanh), Norm, Linear(bias=False))", lambda z: z.deep(7)),
    ("Net: nested, a shared module, a tied weight, a None child", lambda z: z.Net()),
]


# =====================================================================================
# Shared machinery
# =====================================================================================
RECURSION = (
    " __getattr__ probably reads self._parameters (or another table) as an attribute; when that "
    "table does not exist yet (before __init__, or inside copy.deepcopy), this calls __getattr__ "
    "again, forever. Read the tables through self.__dict__."
)


def _where(err: BaseException) -> str:
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if "course_utils" not in f.filename and "site-packages" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" (in {f.name}, line {f.lineno}: `{(f.line or '').strip()}`)"


def _err(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, RecursionError):
        text = "maximum recursion depth exceeded"
    return f"{type(err).__name__}{': ' + text if text else ''}{_where(err)}"


def _attempt(thunk: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, value) or (False, exception); NotImplementedError means the stage is pending."""
    try:
        return True, thunk()
    except NotImplementedError:
        raise _Pending from None
    except CheckFailure:
        raise
    except Exception as err:  # noqa: BLE001 - the learner's error is reported, not raised
        return False, err


def _run(t: Tester, case: str, code: str, thunk: Callable[[], Any]) -> Any:
    """Run learner code that must not raise; a raise fails the check in one sentence."""
    ok, value = _attempt(thunk)
    if not ok:
        hint = RECURSION if isinstance(value, RecursionError) else ""
        t.fail(case, f"`{code}` raised {_err(value)}.{hint}")
    return value


def _as_class(t: Tester, stage: str) -> type:
    cls = t.fn
    if not isinstance(cls, type):
        raise CheckFailure(
            f"pass the class itself, not {type(cls).__name__} "
            f'(for example cu.check("{t.exercise.id}", {stage}), without parentheses).'
        )
    return cls


def _tables_ok(t: Tester, case: str, m: Any, owner: str) -> None:
    d = getattr(m, "__dict__", {})
    for name, kind in (
        ("_parameters", dict),
        ("_buffers", dict),
        ("_non_persistent_buffers_set", set),
        ("_modules", dict),
    ):
        if not isinstance(d.get(name), kind):
            t.fail(
                case,
                f"after {owner}, the instance has no {kind.__name__} `{name}` in its __dict__. "
                "MiniModule.__init__ must create self._parameters, self._buffers and self._modules "
                "(dicts) and self._non_persistent_buffers_set (a set), as nn.Module does"
                + (
                    "; a subclass must call super().__init__() before assigning anything"
                    if owner != "MiniModule()"
                    else ""
                )
                + ".",
            )


def _get(m: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        m = getattr(m, part)
    return m


def _strip(name: str, prefix: str) -> str:
    if not prefix:
        return name
    return "" if name == prefix else name[len(prefix) + 1 :]


def _require_registration(t: Tester, cls: type) -> None:
    """A later stage builds on MiniModule: it cannot pass while registration is wrong."""
    rows = len(t.rows)
    try:
        _registration_script(t, cls)
        _before_init(t, cls)
        _registration_models(t, cls)
    except CheckFailure as failure:
        raise CheckFailure(
            f"this stage builds on MiniModule's registration, which is not right yet "
            f"(mini_module_registration says: {failure})"
        ) from None
    del t.rows[rows:]


def _build_twins(
    t: Tester, cls: type, case: str, build: Callable[[SimpleNamespace], Any]
) -> tuple[Any, Any]:
    """The learner's model and nn.Module's twin; also a sanity check of stage 1."""
    zoo = _zoo(cls)
    mine = _run(t, case, "building the model", lambda: build(zoo))
    theirs = build(_TORCH)
    for path, module in theirs.named_modules(remove_duplicate=False):
        ok, sub = _attempt(lambda path=path: _get(mine, path))
        where = f"model.{path}" if path else "the model"
        if not ok:
            t.fail(
                case, f"reading {where} raised {_err(sub)}; pass mini_module_registration first."
            )
        _tables_ok(t, case, sub, f"building {where}")
        for table in ("_parameters", "_buffers", "_modules"):
            got, want = list(sub.__dict__[table]), list(module.__dict__[table])
            if got != want:
                t.fail(
                    case,
                    f"{where} has {table} {got} but nn.Module registers {want}: "
                    "registration is not right yet; pass mini_module_registration first.",
                )
    return mine, theirs


# =====================================================================================
# Stage 1: registration
# =====================================================================================
P = {f"P{i}": nn.Parameter(torch.full((2,), float(i), dtype=F64)) for i in range(1, 8)}
T = {f"T{i}": torch.full((2,), 10.0 + i, dtype=F64) for i in range(1, 9)}
_TOKENS = {id(v): k for k, v in {**P, **T}.items()}
_TRACKED = (
    "w", "bias", "b", "mean", "scratch", "scratch2", "cache", "child", "other", "bad",
    "z", "buf", "label2", "nothing", "x.y", "",
)  # fmt: skip


def _token(v: Any) -> str:
    if v is None:
        return "None"
    if id(v) in _TOKENS:
        return _TOKENS[id(v)]
    if (
        isinstance(v, nn.Module)
        or hasattr(type(v), "__mro__")
        and "_modules" in getattr(v, "__dict__", {})
    ):
        return f"Leaf({v.__dict__.get('label', '?')})"
    if isinstance(v, bool | int | float | str):
        return repr(v)
    return type(v).__name__


def _view(m: Any) -> dict[str, Any]:
    d = m.__dict__
    return {
        "_parameters": [(k, _token(v)) for k, v in d.get("_parameters", {}).items()],
        "_buffers": [(k, _token(v)) for k, v in d.get("_buffers", {}).items()],
        "_non_persistent_buffers_set": sorted(d.get("_non_persistent_buffers_set", ())),
        "_modules": [(k, _token(v)) for k, v in d.get("_modules", {}).items()],
        "plain attributes in __dict__": sorted(
            (k, _token(v)) for k, v in d.items() if k in _TRACKED
        ),
    }


# (code shown to the learner, what it does to module m given the zoo z, why nn.Module does what it does)
SCRIPT: list[tuple[str, Callable[[Any, Any], Any], str]] = [
    (
        "m.w = P1",
        lambda m, z: setattr(m, "w", P["P1"]),
        "a Parameter assigned as an attribute is registered in m._parameters, not stored in m.__dict__",
    ),
    (
        "m.w",
        lambda m, z: m.w,
        "attribute reads fall back to __getattr__, which looks in _parameters, _buffers and _modules",
    ),
    (
        "m.b = None",
        lambda m, z: setattr(m, "b", None),
        "None under a new name is an ordinary attribute",
    ),
    (
        "m.register_parameter('bias', None)",
        lambda m, z: m.register_parameter("bias", None),
        "register_parameter(name, None) keeps a None placeholder in _parameters (nn.Linear(bias=False) does this)",
    ),
    ("m.bias", lambda m, z: m.bias, "a None placeholder reads as None"),
    (
        "m.bias = P2",
        lambda m, z: setattr(m, "bias", P["P2"]),
        "a Parameter replaces the placeholder in place, keeping its position in _parameters",
    ),
    (
        "m.w = T1 (a plain tensor)",
        lambda m, z: setattr(m, "w", T["T1"]),
        "only a Parameter or None may be assigned to a parameter's name: nn.Module raises TypeError (wrap the tensor in nn.Parameter)",
    ),
    (
        "m.w = None",
        lambda m, z: setattr(m, "w", None),
        "None assigned to a parameter's name keeps the name in _parameters with the value None",
    ),
    (
        "m.w = P3",
        lambda m, z: setattr(m, "w", P["P3"]),
        "a Parameter assigned to a parameter's name replaces it in _parameters",
    ),
    (
        "m.register_buffer('mean', T2)",
        lambda m, z: m.register_buffer("mean", T["T2"]),
        "register_buffer stores the tensor in _buffers",
    ),
    ("m.mean", lambda m, z: m.mean, "buffers read as attributes through __getattr__"),
    (
        "m.mean = T3",
        lambda m, z: setattr(m, "mean", T["T3"]),
        "a tensor assigned to a buffer's name replaces the buffer in _buffers",
    ),
    (
        "m.mean = 3.0",
        lambda m, z: setattr(m, "mean", 3.0),
        "only a tensor or None may be assigned to a buffer's name: nn.Module raises TypeError",
    ),
    (
        "m.register_buffer('scratch', T4, persistent=False)",
        lambda m, z: m.register_buffer("scratch", T["T4"], persistent=False),
        "a non-persistent buffer is in _buffers and its name in _non_persistent_buffers_set",
    ),
    (
        "m.register_buffer('scratch', T4)",
        lambda m, z: m.register_buffer("scratch", T["T4"]),
        "registering it again as persistent removes its name from _non_persistent_buffers_set",
    ),
    (
        "m.register_buffer('scratch2', T5, persistent=False)",
        lambda m, z: m.register_buffer("scratch2", T["T5"], persistent=False),
        "a non-persistent buffer is in _buffers and its name in _non_persistent_buffers_set",
    ),
    (
        "m.cache = T6 (a plain tensor, new name)",
        lambda m, z: setattr(m, "cache", T["T6"]),
        "a plain tensor under a new name is an ordinary attribute in __dict__; only register_buffer makes a buffer",
    ),
    (
        "m.child = Leaf('a')",
        lambda m, z: setattr(m, "child", z.Leaf("a")),
        "a module assigned as an attribute is registered in _modules",
    ),
    (
        "m.child = 5",
        lambda m, z: setattr(m, "child", 5),
        "only a module or None may be assigned to a child module's name: nn.Module raises TypeError",
    ),
    (
        "m.child = None",
        lambda m, z: setattr(m, "child", None),
        "None assigned to a child's name keeps the name in _modules with the value None",
    ),
    (
        "m.add_module('other', Leaf('b'))",
        lambda m, z: m.add_module("other", z.Leaf("b")),
        "add_module stores the module in _modules",
    ),
    (
        "m.add_module('bad', 5)",
        lambda m, z: m.add_module("bad", 5),
        "add_module refuses what is not a module with TypeError",
    ),
    (
        "m.register_parameter('x.y', P4)",
        lambda m, z: m.register_parameter("x.y", P["P4"]),
        "a name with a dot would break the dotted names of named_parameters and state_dict: nn.Module raises KeyError",
    ),
    (
        "m.register_parameter('', P4)",
        lambda m, z: m.register_parameter("", P["P4"]),
        "an empty name is refused with KeyError",
    ),
    (
        "m.register_parameter('cache', P4)",
        lambda m, z: m.register_parameter("cache", P["P4"]),
        "register_parameter refuses, with KeyError, a name that is already an ordinary attribute",
    ),
    (
        "m.register_parameter('z', T7) (a plain tensor)",
        lambda m, z: m.register_parameter("z", T["T7"]),
        "register_parameter accepts only a Parameter or None: nn.Module raises TypeError",
    ),
    (
        "m.register_buffer('w', T8)",
        lambda m, z: m.register_buffer("w", T["T8"]),
        "register_buffer refuses, with KeyError, a name that is already a parameter",
    ),
    (
        "m.register_buffer('buf', 3)",
        lambda m, z: m.register_buffer("buf", 3),
        "register_buffer accepts only a tensor or None: nn.Module raises TypeError",
    ),
    (
        "m.cache = P5",
        lambda m, z: setattr(m, "cache", P["P5"]),
        "a Parameter assigned over an ordinary attribute moves it out of __dict__ into _parameters (left in __dict__, it would hide the parameter, because __getattr__ only runs when ordinary lookup fails)",
    ),
    ("m.cache", lambda m, z: m.cache, "the name now reads as the parameter"),
    (
        "m.mean = P6",
        lambda m, z: setattr(m, "mean", P["P6"]),
        "a Parameter assigned over a buffer removes the buffer and registers the parameter",
    ),
    (
        "m.scratch2 = Leaf('c')",
        lambda m, z: setattr(m, "scratch2", z.Leaf("c")),
        "a module assigned over a non-persistent buffer removes it from _buffers and from _non_persistent_buffers_set",
    ),
    (
        "m.w = Leaf('d')",
        lambda m, z: setattr(m, "w", z.Leaf("d")),
        "a parameter's name accepts only a Parameter or None: nn.Module refuses even a module with TypeError (del the parameter first)",
    ),
    ("del m.w", lambda m, z: delattr(m, "w"), "del removes the name from whichever table holds it"),
    ("del m.bias", lambda m, z: delattr(m, "bias"), "del removes a parameter from _parameters"),
    ("hasattr(m, 'bias')", lambda m, z: hasattr(m, "bias"), "a deleted parameter is gone"),
    ("del m.scratch", lambda m, z: delattr(m, "scratch"), "del removes a buffer from _buffers"),
    (
        "del m.nothing",
        lambda m, z: delattr(m, "nothing"),
        "deleting a name that does not exist raises AttributeError",
    ),
    (
        "hasattr(m, 'nothing')",
        lambda m, z: hasattr(m, "nothing"),
        "hasattr returns False only when the lookup raises AttributeError: __getattr__ must raise AttributeError, not KeyError",
    ),
    (
        "getattr(m, 'nothing', 7)",
        lambda m, z: getattr(m, "nothing", 7),
        "getattr with a default needs __getattr__ to raise AttributeError",
    ),
    (
        "m.label2 = 'text'",
        lambda m, z: setattr(m, "label2", "text"),
        "anything else is an ordinary attribute",
    ),
    ("m.training", lambda m, z: m.training, "a fresh module is in training mode"),
]


def _outcome_text(ok: bool, value: Any) -> str:
    return f"returned {_token(value)}" if ok else f"raised {type(value).__name__}"


def _judge_step(
    t: Tester, case: str, code: str, why: str, mine: tuple[bool, Any], ref: tuple[bool, Any]
) -> None:
    (ok_m, val_m), (ok_r, val_r) = mine, ref
    if not ok_r and ok_m:
        t.fail(
            case,
            f"`{code}` should raise {type(val_r).__name__}, but MiniModule accepted it: {why}.",
        )
    extra = ""
    if not ok_m and isinstance(val_m, KeyError) and (ok_r or isinstance(val_r, AttributeError)):
        extra = (
            " __getattr__ must raise AttributeError for a missing name (a KeyError from a dict "
            "lookup breaks hasattr and getattr with a default)."
        )
    if ok_r and not ok_m:
        t.fail(case, f"`{code}` raised {_err(val_m)}, but nn.Module accepts it: {why}.{extra}")
    if not ok_r and not isinstance(val_m, type(val_r)):
        t.fail(
            case,
            f"`{code}` raised {_err(val_m)}, but nn.Module raises {type(val_r).__name__}: {why}.{extra}",
        )
    if ok_r and _token(val_m) != _token(val_r):
        t.fail(
            case,
            f"`{code}` returned {_token(val_m)}, but nn.Module returns {_token(val_r)}: {why}.",
        )


def _judge_view(t: Tester, case: str, code: str, why: str, mine: Any, ref: Any) -> None:
    got, want = _view(mine), _view(ref)
    for key, want_v in want.items():
        if got[key] != want_v:
            hint = ""
            if key == "_parameters" and ("w", "P1") in got["plain attributes in __dict__"]:
                hint = (
                    " The Parameter was stored in the instance __dict__ (object.__setattr__) instead of "
                    "self._parameters, so it is invisible to parameters() and state_dict()."
                )
            t.fail(
                case,
                f"after `{code}`, {key} is {got[key]}, but nn.Module has {want_v}: {why}.{hint}",
            )


def _registration_script(t: Tester, cls: type) -> None:
    case = "the assignment script on an empty MiniModule()"
    zoo = _zoo(cls)
    m = _run(t, case, "MiniModule()", cls)
    _tables_ok(t, case, m, "MiniModule()")
    r = nn.Module()
    for code, step, why in SCRIPT:
        ref = _attempt(lambda step=step: step(r, _TORCH))
        mine = _attempt(lambda step=step: step(m, zoo))
        if not mine[0] and isinstance(mine[1], RecursionError):
            t.fail(case, f"`{code}` raised {_err(mine[1])}.{RECURSION}")
        _judge_step(t, case, code, why, mine, ref)
        _judge_view(t, case, code, why, m, r)
    t.ok(case, f"{len(SCRIPT)} assignments, reads, registrations and deletions")


def _before_init(t: Tester, cls: type) -> None:
    zoo = _zoo(cls)
    cases = [
        ("a Parameter", lambda self: setattr(self, "w", P["P1"]), AttributeError),
        ("a module", lambda self, z=zoo: setattr(self, "child", z.Leaf("x")), AttributeError),
        ("a plain attribute", lambda self: setattr(self, "size", 3), None),
    ]
    for what, assign, raises in cases:
        case = f"a subclass assigning {what} before super().__init__()"

        class Early(cls):
            def __init__(self, assign: Callable[[Any], None] = assign) -> None:
                assign(self)
                super().__init__()

        ok, value = _attempt(Early)
        if raises is None and not ok:
            t.fail(
                case,
                f"`self.size = 3` before super().__init__() raised {_err(value)}, but nn.Module "
                "allows ordinary attributes before __init__: __setattr__ must not assume the tables "
                "exist (look them up with self.__dict__.get('_parameters')).",
            )
        if raises is not None and ok:
            t.fail(
                case,
                f"assigning {what} before super().__init__() should raise AttributeError, as in nn.Module, but it was accepted.",
            )
        if raises is not None and not isinstance(value, raises):
            hint = RECURSION if isinstance(value, RecursionError) else ""
            t.fail(
                case,
                f"assigning {what} before super().__init__() raised {_err(value)}, but nn.Module raises "
                f"AttributeError (there is no table to register it in yet).{hint}",
            )
        t.ok(case, "AttributeError" if raises else "allowed")


def _registration_models(t: Tester, cls: type) -> None:
    for desc, build in MODELS:
        case = f"building {desc}"
        mine, theirs = _build_twins(t, cls, case, build)
        for path, module in theirs.named_modules(remove_duplicate=False):
            sub = _get(mine, path)
            where = f"model.{path}" if path else "the model"
            got = sorted(sub.__dict__["_non_persistent_buffers_set"])
            want = sorted(module._non_persistent_buffers_set)
            if got != want:
                t.fail(
                    case,
                    f"{where} has _non_persistent_buffers_set {got}, but nn.Module has {want}.",
                )
            if sub.training is not True:
                t.fail(
                    case,
                    f"{where}.training is {sub.training!r}; a new module is in training mode (True).",
                )
        if desc.startswith("Net"):
            if _get(mine, "head.weight") is not _get(mine, "embed.weight"):
                t.fail(
                    case,
                    "after `self.head.weight = self.embed.weight`, model.head.weight is not the same object as model.embed.weight.",
                )
            if _get(mine, "again") is not _get(mine, "block"):
                t.fail(
                    case,
                    "after `self.again = self.block`, model.again is not the same object as model.block.",
                )
            if "cache" not in mine.__dict__ or "cache" in mine.__dict__["_buffers"]:
                t.fail(
                    case,
                    "`self.cache = torch.zeros(2)` must stay an ordinary attribute (in __dict__), not a buffer.",
                )
            clone = _run(t, case, "copy.deepcopy(model)", lambda mine=mine: copy.deepcopy(mine))
            w0, w1 = (
                _get(mine, "embed.weight"),
                _run(
                    t,
                    case,
                    "copy.deepcopy(model).embed.weight",
                    lambda clone=clone: _get(clone, "embed.weight"),
                ),
            )
            if w1 is w0 or not torch.equal(w1, w0) or _get(clone, "head.weight") is not w1:
                t.fail(
                    case,
                    "copy.deepcopy(model) should give new, equal parameters, with the tie (head.weight is embed.weight) kept.",
                )
        t.ok(case, "tables of every submodule")


@exercise(
    "mini_module_registration",
    chapter=CHAPTER,
    signature=(
        "class MiniModule: __init__(), __setattr__(name, value), __getattr__(name), __delattr__(name), "
        "register_parameter(name, param), register_buffer(name, tensor, persistent=True), add_module(name, module)"
    ),
    summary="nn.Module's registration: attributes routed into _parameters, _buffers "
    "(+ _non_persistent_buffers_set) and _modules, with nn.Module's errors",
    reference=RefMiniModule,
)
def check_mini_module_registration(t: Tester) -> None:
    """42 scripted assignments against nn.Module, assignments before __init__, four models, deepcopy."""
    cls = _as_class(t, "MiniModule")
    _registration_script(t, cls)
    _before_init(t, cls)
    _registration_models(t, cls)


# =====================================================================================
# Stage 2: traversal
# =====================================================================================
def _pairs(t: Tester, case: str, code: str, thunk: Callable[[], Any]) -> list[tuple[str, Any]]:
    got = _run(t, case, code, lambda: list(thunk()))
    for item in got:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            t.fail(
                case, f"`{code}` should yield (name, object) pairs, but it yielded {_token(item)}."
            )
    return got


def _name_hints(
    got: list[str], want: list[str], theirs: Any, method: str, prefix: str, kwargs: dict[str, Any]
) -> str:
    kind = {
        "named_parameters": "parameter",
        "named_buffers": "buffer",
        "named_modules": "module",
    }.get(method, "module")
    if set(got) == set(want) and len(got) == len(want):
        return (
            " Same names, different order: nn.Module walks the tree in pre-order (a module's own "
            f"{kind}s first, then each child in registration order)."
        )
    if len(got) > len(want) and set(want) <= set(got):
        if method != "named_children" and kwargs.get("remove_duplicate", True):
            every = [n for n, _ in getattr(theirs, method)(**{**kwargs, "remove_duplicate": False})]
            extra = [n for n in got if n not in want]
            if set(extra) <= set(every):
                return (
                    f" {extra} name {kind}s already listed under another name (shared or tied): "
                    f"a shared {kind} must be listed once (remember the objects already yielded, by identity)."
                )
        if method == "named_children":
            return " The same child module registered under two names must be listed once."
    if method == "named_buffers":
        persistent = [n for n in want if n.rsplit(".", 1)[-1] != "scratch"]
        if got == persistent and persistent != want:
            return " The non-persistent buffers are missing: named_buffers lists every buffer; only state_dict leaves the non-persistent ones out."
    bare = [n.rsplit(".", 1)[-1] for n in want]
    if got == bare and bare != want:
        return " The names lack their module's path: a parameter of block.fc is 'block.fc.weight', not 'weight'."
    if got == [n.replace(".", "") for n in want] and "." in "".join(want):
        return " The prefix and the name were joined without a dot."
    if got and all(n.startswith(".") for n in got if n):
        return " There is a leading dot: join with a dot only when the prefix is not empty."
    if kwargs.get("recurse", True) and method in ("named_parameters", "named_buffers"):
        shallow = [n for n, _ in getattr(theirs, method)(prefix=prefix, recurse=False)]
        if got == shallow and shallow != want:
            return " Only the module's own entries are listed: recurse into the submodules (recurse=True is the default)."
        if set(got) >= set(shallow) and set(got) < set(want):
            return " Some submodules were skipped; visit every module that named_modules() yields."
    if method == "named_modules" and got == want[1:]:
        return " The module itself is missing: named_modules yields (prefix, self) first."
    return ""


def _judge_pairs(
    t: Tester, case: str, mine: Any, theirs: Any, method: str, kwargs: dict[str, Any]
) -> None:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    code = f"model.{method}({args})"
    got = _pairs(t, case, code, lambda: getattr(mine, method)(**kwargs))
    want = [n for n, _ in getattr(theirs, method)(**kwargs)]
    names = [n for n, _ in got]
    if names != want:
        hint = _name_hints(names, want, theirs, method, kwargs.get("prefix", ""), kwargs)
        t.fail(case, f"`{code}` gave {names}, but nn.Module gives {want}.{hint}")
    prefix = kwargs.get("prefix", "")
    for name, obj in got:
        path = _strip(name, prefix)
        expected = _get(mine, path)
        if obj is not expected:
            what = f"model.{path}" if path else "the model itself"
            t.fail(
                case,
                f"`{code}` paired {name!r} with {_token(obj)}, not with {what} (the object itself, not a copy).",
            )
    t.ok(case, code)


def _judge_plain(t: Tester, case: str, mine: Any, theirs: Any, method: str, named: str) -> None:
    code = f"model.{method}()"
    got = _run(t, case, code, lambda: list(getattr(mine, method)()))
    want = [_get(mine, n) for n, _ in getattr(theirs, named)()]
    if len(got) != len(want) or any(a is not b for a, b in zip(got, want, strict=False)):
        t.fail(
            case,
            f"`{code}` gave {len(got)} objects, but they should be the {len(want)} objects of `{named}()`, in the same order.",
        )
    t.ok(case, code)


def _paths(theirs: Any) -> list[str]:
    return [n for n, _ in theirs.named_modules(remove_duplicate=False)]


def _flags(mine: Any, theirs: Any) -> tuple[dict[str, Any], dict[str, bool]]:
    return (
        {p: _get(mine, p).__dict__.get("training", "missing") for p in _paths(theirs)},
        {p: _get(theirs, p).training for p in _paths(theirs)},
    )


def _judge_train(t: Tester, case: str, mine: Any, theirs: Any) -> None:
    steps: list[tuple[str, str, bool | None]] = [
        ("model.eval()", "", None),
        ("model.train()", "", True),
        ("model.train(False)", "", False),
        ("model.train(True)", "", True),
    ]
    if "block" in _paths(theirs):
        steps.append(("model.block.eval()", "block", None))
    for code, path, mode in steps:

        def act(m: Any, path: str = path, mode: bool | None = mode) -> Any:
            target = _get(m, path)
            return target.eval() if mode is None else target.train(mode)

        ret_r = act(theirs)
        ret_m = _run(t, case, code, lambda act=act: act(mine))
        if ret_m is not _get(mine, path):
            t.fail(
                case,
                f"`{code}` returned {_token(ret_m)}; it must return the module itself, so that `model = Net().eval()` works.",
            )
        assert ret_r is _get(theirs, path)
        got, want = _flags(mine, theirs)
        for p in want:
            if got[p] != want[p]:
                where = f"model.{p}" if p else "model"
                hint = (
                    " train(mode) must set the flag on every child, recursively (through children())."
                    if p != path
                    else ""
                )
                t.fail(
                    case,
                    f"after `{code}`, {where}.training is {got[p]!r}, but nn.Module gives {want[p]!r}.{hint}",
                )
    t.ok(case, "train() / eval() flags and return values")


def _judge_apply(t: Tester, case: str, mine: Any, theirs: Any) -> None:
    ids_m = {}
    for p in reversed(_paths(theirs)):
        ids_m[id(_get(mine, p))] = p
    ids_r = {id(_get(theirs, p)): p for p in reversed(_paths(theirs))}
    seen_m: list[str] = []
    seen_r: list[str] = []
    theirs.apply(lambda mod: seen_r.append(ids_r[id(mod)]))
    ret = _run(
        t,
        case,
        "model.apply(fn)",
        lambda: mine.apply(lambda mod: seen_m.append(ids_m.get(id(mod), "?"))),
    )
    if seen_m != seen_r:
        hint = ""
        if sorted(seen_m) == sorted(seen_r):
            hint = (
                " apply calls fn on the children first (recursively) and on the module itself last."
            )
        elif len(seen_m) > len(seen_r):
            hint = " A module registered twice must be visited once: walk children(), which skips repeats."
        t.fail(
            case,
            f"`model.apply(fn)` called fn on {seen_m}, but nn.Module calls it on {seen_r}.{hint}",
        )
    if ret is not mine:
        t.fail(case, f"`model.apply(fn)` returned {_token(ret)}; it must return the module itself.")
    t.ok(case, "apply(fn) order")


def _judge_zero_grad(t: Tester, case: str, mine: Any, theirs: Any) -> None:
    names = [n for n, _ in theirs.named_parameters()]
    for set_to_none in (None, False, True):
        grads = {}
        for i, n in enumerate(names):
            if i == 1:  # one parameter has no gradient at all
                _get(mine, n).grad = None
                continue
            grads[n] = torch.full_like(_get(mine, n), float(i + 1))
            _get(mine, n).grad = grads[n]
        code = (
            "model.zero_grad()"
            if set_to_none is None
            else f"model.zero_grad(set_to_none={set_to_none})"
        )
        _run(
            t,
            case,
            code,
            lambda s=set_to_none: mine.zero_grad() if s is None else mine.zero_grad(set_to_none=s),
        )
        for n in names:
            g = _get(mine, n).grad
            if n not in grads:
                if g is not None:
                    t.fail(
                        case,
                        f"after `{code}`, model.{n}.grad is a tensor, but it was None before and must stay None.",
                    )
            elif set_to_none is False:
                if g is None:
                    t.fail(
                        case,
                        f"after `{code}`, model.{n}.grad is None, but set_to_none=False keeps the gradient tensors and fills them with zeros.",
                    )
                if g is not grads[n] or not torch.all(g == 0):
                    t.fail(
                        case,
                        f"after `{code}`, model.{n}.grad should be the same tensor as before, zeroed in place (grad.zero_()).",
                    )
            elif g is not None:
                t.fail(
                    case,
                    f"after `{code}`, model.{n}.grad is a tensor, but nn.Module sets it to None"
                    + (
                        " (set_to_none=True is the default since PyTorch 2.0)."
                        if set_to_none is None
                        else "."
                    ),
                )
    t.ok(case, "zero_grad(), set_to_none True and False")


def _judge_to(t: Tester, case: str, mine: Any, theirs: Any) -> None:
    before = {n: p for n, p in theirs.named_parameters(remove_duplicate=False)}
    mine_before = {n: _get(mine, n) for n in before}
    for dtype in (torch.float32, F64):
        code = f"model.to({dtype})"
        theirs.to(dtype)
        ret = _run(t, case, code, lambda dtype=dtype: mine.to(dtype))
        if ret is not mine:
            t.fail(case, f"`{code}` returned {_token(ret)}; it must return the module itself.")
        want = {
            n: v
            for n, v in itertools.chain(
                theirs.named_parameters(remove_duplicate=False),
                theirs.named_buffers(remove_duplicate=False),
            )
        }
        for n, v in want.items():
            g = _get(mine, n)
            if not torch.is_tensor(g) or g.dtype != v.dtype:
                hint = (
                    " Integer buffers (like a step counter) keep their dtype: convert floating-point tensors only."
                    if not v.is_floating_point()
                    else ""
                )
                t.fail(
                    case,
                    f"after `{code}`, model.{n} has dtype {getattr(g, 'dtype', None)}, but nn.Module gives {v.dtype}.{hint}",
                )
            if n in mine_before and g is not mine_before[n]:
                t.fail(
                    case,
                    f"after `{code}`, model.{n} is a new object: convert a parameter in place "
                    "(param.data = param.data.to(dtype)) so the same Parameter objects stay registered "
                    "with optimizers and tied weights stay tied.",
                )
            if not torch.equal(g.double(), v.double()):
                t.fail(
                    case,
                    f"after `{code}`, the values of model.{n} changed (beyond the rounding of the conversion).",
                )
    t.ok(case, "to(float32) and back: dtypes, same objects")


TRAVERSAL_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("named_parameters", {}),
    ("named_parameters", {"prefix": "model"}),
    ("named_parameters", {"recurse": False}),
    ("named_parameters", {"remove_duplicate": False}),
    ("named_buffers", {}),
    ("named_buffers", {"prefix": "model", "remove_duplicate": False}),
    ("named_buffers", {"recurse": False}),
    ("named_children", {}),
    ("named_modules", {}),
    ("named_modules", {"prefix": "model"}),
    ("named_modules", {"remove_duplicate": False}),
]


@exercise(
    "mini_module_traversal",
    chapter=CHAPTER,
    signature=(
        "class MiniModuleTraversal(MiniModule): named_parameters(prefix='', recurse=True, remove_duplicate=True), "
        "parameters(recurse=True), named_buffers(prefix='', recurse=True, remove_duplicate=True), buffers(recurse=True), "
        "named_children(), children(), named_modules(memo=None, prefix='', remove_duplicate=True), modules(), "
        "apply(fn), train(mode=True), eval(), zero_grad(set_to_none=True), to(dtype)"
    ),
    summary="walking the module tree as nn.Module does: dotted names, pre-order, shared objects once, "
    "apply, train/eval, zero_grad, to(dtype)",
    reference=RefMiniModule,
)
def check_mini_module_traversal(t: Tester) -> None:
    """Four models (nested, shared module, tied weight, None child): every generator and mode switch."""
    cls = _as_class(t, "MiniModuleTraversal")
    _require_registration(t, cls)
    for desc, build in MODELS:
        case = desc
        mine, theirs = _build_twins(t, cls, case, build)
        for method, kwargs in TRAVERSAL_CALLS:
            _judge_pairs(t, case, mine, theirs, method, kwargs)
        for method, named in (
            ("parameters", "named_parameters"),
            ("buffers", "named_buffers"),
            ("children", "named_children"),
            ("modules", "named_modules"),
        ):
            _judge_plain(t, case, mine, theirs, method, named)
        _judge_train(t, case, mine, theirs)
        _judge_apply(t, case, mine, theirs)
        _judge_zero_grad(t, case, mine, theirs)
        _judge_to(t, case, mine, theirs)


# =====================================================================================
# Stage 3: state dict
# =====================================================================================
def _state(t: Tester, case: str, code: str, thunk: Callable[[], Any]) -> dict[str, Any]:
    sd = _run(t, case, code, thunk)
    if not isinstance(sd, dict):
        t.fail(
            case,
            f"`{code}` returned {_token(sd)}; it should return a dict (an OrderedDict, as nn.Module does).",
        )
    return sd


def _judge_state_dict(t: Tester, case: str, mine: Any, theirs: Any) -> None:
    for kwargs in ({}, {"prefix": "model."}, {"keep_vars": True}):
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        code = f"model.state_dict({args})"
        sd = _state(t, case, code, lambda kwargs=kwargs: mine.state_dict(**kwargs))
        want = theirs.state_dict(**kwargs)
        got_keys, want_keys = list(sd), list(want)
        if got_keys != want_keys:
            hint = ""
            non_persistent = [k for k in got_keys if k.endswith("scratch")]
            params_only = [k for k in want_keys if not k.endswith(("running_mean", "steps"))]
            if non_persistent:
                hint = f" {non_persistent} are non-persistent buffers (persistent=False): they stay out of the state dict."
            elif got_keys == params_only and params_only != want_keys:
                hint = " The buffers are missing: a state dict holds the parameters and the persistent buffers."
            elif set(want_keys) > set(got_keys):
                gone = [k for k in want_keys if k not in got_keys]
                hint = (
                    f" {gone} are missing. Unlike named_parameters, state_dict lists a shared or tied "
                    "tensor under every name it has (loading must fill every place), so do not "
                    "de-duplicate."
                )
            elif sorted(got_keys) == sorted(want_keys):
                hint = (
                    " Same keys, different order: for each module, its parameters, then its persistent "
                    "buffers, then each child's entries (nn.Module's _save_to_state_dict, then recursion)."
                )
            t.fail(case, f"`{code}` has keys {got_keys}, but nn.Module gives {want_keys}.{hint}")
        prefix = kwargs.get("prefix", "")
        for key in want_keys:
            v, obj = sd[key], _get(mine, key[len(prefix) :])
            if kwargs.get("keep_vars"):
                if v is not obj:
                    t.fail(
                        case,
                        f"`{code}`[{key!r}] should be model.{key} itself (keep_vars=True keeps the Parameter).",
                    )
                continue
            if not torch.is_tensor(v) or not torch.equal(v, want[key]):
                t.fail(
                    case,
                    f"`{code}`[{key!r}] is {_token(v)} with values different from nn.Module's.",
                )
            if v.requires_grad or isinstance(v, nn.Parameter):
                t.fail(
                    case,
                    f"`{code}`[{key!r}] is still attached to autograd (requires_grad=True): state_dict returns "
                    "detached tensors (param.detach()) unless keep_vars=True.",
                )
            if v.data_ptr() != obj.data_ptr():
                t.fail(
                    case,
                    f"`{code}`[{key!r}] does not share memory with model.{key[len(prefix) :]}: nn.Module returns "
                    "param.detach() (a view of the same storage), not a copy.",
                )
    t.ok(case, "state_dict() keys, values, prefix, keep_vars")


def _incompatible(t: Tester, case: str, code: str, result: Any) -> tuple[list[str], list[str]]:
    try:
        missing, unexpected = result
        a, b = result.missing_keys, result.unexpected_keys
    except Exception:  # noqa: BLE001 - any shape of wrong answer gets the same sentence
        t.fail(
            case,
            f"`{code}` returned {_token(result)}; it should return a named tuple (missing_keys, "
            "unexpected_keys), for example a collections.namedtuple, as nn.Module does.",
        )
    if list(a) != list(missing) or list(b) != list(unexpected):
        t.fail(
            case,
            f"`{code}` returned a tuple whose fields disagree with its .missing_keys/.unexpected_keys.",
        )
    return list(missing), list(unexpected)


def _judge_load(
    t: Tester, case: str, cls: type, desc: str, build: Callable[[SimpleNamespace], Any]
) -> None:
    zoo = _zoo(cls)
    source = build(_TORCH)
    # Different numbers in the destination, so that a load that does nothing is caught.
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
        for b in source.buffers():
            b.add_(2)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    full = list(sd)
    variants: list[tuple[str, dict[str, Tensor]]] = [("the full state dict", sd)]
    drop = full[1] if len(full) > 1 else full[0]
    variants.append((f"without {drop!r}", {k: v for k, v in sd.items() if k != drop}))
    extra = dict(sd)
    extra["extra"] = torch.zeros(1, dtype=F64)
    extra[f"{full[-1].rsplit('.', 1)[0]}.ghost.weight" if "." in full[-1] else "ghost.weight"] = (
        torch.zeros(1)
    )
    if any(k.endswith("running_mean") for k in full):
        key = next(k for k in full if k.endswith("running_mean"))
        extra[key.replace("running_mean", "scratch")] = torch.zeros(4, dtype=F64)
    variants.append(("with unexpected keys (one names a non-persistent buffer)", extra))
    for what, state in variants:
        for strict in (False, True):
            code = f"model.load_state_dict(<{what}>, strict={strict})"
            mine = _run(t, case, "building the model", lambda: build(zoo))
            theirs = build(_TORCH)
            before = {n: _get(mine, n) for n, _ in theirs.named_parameters(remove_duplicate=False)}
            ok_r, res_r = _attempt(
                lambda theirs=theirs, state=state, strict=strict: theirs.load_state_dict(
                    dict(state), strict=strict
                )
            )
            given = {k: v.clone() for k, v in state.items()}
            ok_m, res_m = _attempt(
                lambda mine=mine, given=given, strict=strict: mine.load_state_dict(
                    given, strict=strict
                )
            )
            if ok_r and not ok_m:
                t.fail(
                    case,
                    f"`{code}` raised {_err(res_m)}, but nn.Module loads it and reports the keys.",
                )
            if not ok_r:
                if ok_m:
                    hint = (
                        " In strict mode, missing or unexpected keys are an error: raise RuntimeError naming them."
                        if strict
                        else ""
                    )
                    t.fail(
                        case,
                        f"`{code}` should raise RuntimeError, but it returned {_token(res_m)}.{hint}",
                    )
                if not isinstance(res_m, RuntimeError):
                    t.fail(
                        case, f"`{code}` raised {_err(res_m)}, but nn.Module raises RuntimeError."
                    )
                keys = [k for k in full if k not in state] + [k for k in state if k not in full]
                absent = [k for k in keys if k not in str(res_m)]
                if absent:
                    t.fail(
                        case,
                        f"`{code}` raised RuntimeError, but its message does not name {absent}; say which keys are missing and which are unexpected.",
                    )
                t.ok(case, f"{code} raises")
                continue
            missing, unexpected = _incompatible(t, case, code, res_m)
            if sorted(missing) != sorted(res_r.missing_keys):
                t.fail(
                    case,
                    f"`{code}` reported missing_keys {missing}, but nn.Module reports {res_r.missing_keys}.",
                )
            if sorted(unexpected) != sorted(res_r.unexpected_keys):
                hint = (
                    " A non-persistent buffer's name is unexpected too: it is not part of the state."
                    if any(k.endswith("scratch") for k in res_r.unexpected_keys)
                    else ""
                )
                t.fail(
                    case,
                    f"`{code}` reported unexpected_keys {unexpected}, but nn.Module reports {res_r.unexpected_keys}.{hint}",
                )
            for n, obj in before.items():
                now = _get(mine, n)
                if now is not obj:
                    t.fail(
                        case,
                        f"after `{code}`, model.{n} is a new object: copy into the existing tensors "
                        "(with torch.no_grad(): param.copy_(value)) so optimizers holding them keep working.",
                    )
            for k, v in theirs.state_dict().items():
                now = _get(mine, k)
                if not torch.equal(now, v):
                    t.fail(case, f"after `{code}`, model.{k} differs from what nn.Module loaded.")
            for k, v in given.items():
                v.add_(100)  # a loaded model must own its numbers, not alias the checkpoint's
                if k in full and k in state and torch.equal(_get(mine, k), v):
                    t.fail(
                        case,
                        f"after `{code}`, changing the checkpoint's {k!r} changed the model: copy the values (param.copy_(value)), do not alias them.",
                    )
            t.ok(case, f"{code}")
    key = full[0]
    bad = dict(sd)
    bad[key] = torch.zeros(*(s + 1 for s in sd[key].shape), 2, dtype=F64)
    for strict in (True, False):
        code = f"model.load_state_dict(<{key!r} with the wrong shape>, strict={strict})"
        mine = _run(t, case, "building the model", lambda: build(zoo))
        ok_r, _ = _attempt(
            lambda strict=strict: build(_TORCH).load_state_dict(dict(bad), strict=strict)
        )
        assert not ok_r, "nn.Module accepted a shape mismatch"
        ok_m, res_m = _attempt(
            lambda mine=mine, strict=strict: mine.load_state_dict(dict(bad), strict=strict)
        )
        if ok_m or not isinstance(res_m, RuntimeError):
            got = "accepted it" if ok_m else f"raised {_err(res_m)}"
            t.fail(
                case,
                f"`{code}` {got}, but nn.Module raises RuntimeError (size mismatch), strict or not.",
            )
    t.ok(case, "shape mismatch raises RuntimeError")


@exercise(
    "mini_module_state_dict",
    chapter=CHAPTER,
    signature=(
        "class MiniModuleState(MiniModuleTraversal): state_dict(*, destination=None, prefix='', keep_vars=False), "
        "load_state_dict(state_dict, strict=True) -> (missing_keys, unexpected_keys)"
    ),
    summary="state_dict (parameters and persistent buffers, detached, every name of a shared tensor) and "
    "load_state_dict (in-place copy, missing/unexpected keys, RuntimeError when strict)",
    reference=RefMiniModule,
)
def check_mini_module_state_dict(t: Tester) -> None:
    """Four models: keys and values, prefix, keep_vars; loads of full, partial and padded dicts."""
    cls = _as_class(t, "MiniModuleState")
    _require_registration(t, cls)
    for desc, build in MODELS:
        mine, theirs = _build_twins(t, cls, desc, build)
        _judge_state_dict(t, desc, mine, theirs)
        _judge_load(t, desc, cls, desc, build)
        # a round trip through the learner's own state_dict, after changing every parameter
        other = _run(t, desc, "building a second model", lambda build=build: build(_zoo(cls)))
        with torch.no_grad():
            for n, _p in theirs.named_parameters():
                _get(mine, n).mul_(-1.0)
        sd = _state(t, desc, "model.state_dict()", mine.state_dict)
        _run(
            t,
            desc,
            "other.load_state_dict(model.state_dict())",
            lambda other=other, sd=sd: other.load_state_dict(sd),
        )
        for n, _p in theirs.named_parameters():
            if not torch.equal(_get(other, n), _get(mine, n)):
                t.fail(
                    desc,
                    f"after `other.load_state_dict(model.state_dict())`, other.{n} differs from model.{n}.",
                )
        t.ok(desc, "round trip")


# =====================================================================================
# Stage 4: hooks
# =====================================================================================
def _hook_models(z: SimpleNamespace) -> Any:
    return z.Seq(z.Linear(3, 4, seed=1), z.Tanh(), z.Linear(4, 2, seed=2))


def _call_log(
    t: Tester,
    case: str,
    model: Any,
    paths: list[str],
    x: Any,
    setup: Callable[[Any, list, dict], None],
    learner: bool,
    hint: str = "",
) -> tuple[Any, list]:
    log: list = []
    index = {id(_get(model, p)): p for p in reversed(paths)}

    def body() -> Any:
        setup(model, log, index)
        return model(x)

    if not learner:
        return body(), log
    ok, out = _attempt(body)
    if not ok:
        t.fail(case, f"registering the hooks and calling the model raised {_err(out)}. {hint}")
    return out, log


def _describe(v: Any) -> Any:
    if torch.is_tensor(v):
        return ("tensor", tuple(v.shape), round(float(v.detach().double().sum()), 6))
    if isinstance(v, tuple):
        return ("tuple", tuple(_describe(a) for a in v))
    if isinstance(v, list):
        return ("list", tuple(_describe(a) for a in v))
    return (type(v).__name__,)


def _hook_scenarios() -> list[tuple[str, str, Callable[[Any, list, dict], None]]]:
    """(name, hint when the log differs, setup(model, log, index))."""

    def logging(kind: str, tag: str = "") -> Callable[..., Any]:
        def hook(module: Any, *rest: Any, log: list, index: dict) -> None:
            log.append((index.get(id(module), "?"), kind + tag, tuple(_describe(r) for r in rest)))

        return hook

    def bind(hook: Callable[..., Any], log: list, index: dict) -> Callable[..., Any]:
        return lambda *a: hook(*a, log=log, index=index)

    def every_module(model: Any, log: list, index: dict) -> None:
        for path in dict.fromkeys(index.values()):
            mod = _get(model, path)
            for tag in ("1", "2"):
                mod.register_forward_pre_hook(bind(logging("pre", tag), log, index))
                mod.register_forward_hook(bind(logging("post", tag), log, index))

    def chained_pre(model: Any, log: list, index: dict) -> None:
        model.register_forward_pre_hook(lambda m, args: (args[0] + 1.0,))
        model.register_forward_pre_hook(lambda m, args: args[0] * 3.0)  # a bare tensor, not a tuple
        model.register_forward_pre_hook(lambda m, args: None)
        model.register_forward_hook(bind(logging("post"), log, index))

    def chained_post(model: Any, log: list, index: dict) -> None:
        model.register_forward_hook(lambda m, args, out: out + 10.0)
        model.register_forward_hook(lambda m, args, out: None)
        model.register_forward_hook(lambda m, args, out: out * 2.0)
        model.register_forward_hook(bind(logging("post"), log, index))

    def removed(model: Any, log: list, index: dict) -> None:
        a, b = bind(logging("pre", "A"), log, index), bind(logging("pre", "B"), log, index)
        model.register_forward_pre_hook(a)
        model.register_forward_pre_hook(b)
        third = model.register_forward_pre_hook(a)
        gone = model.register_forward_hook(lambda m, args, out: out * 0.0)
        model.register_forward_hook(bind(logging("post"), log, index))
        third.remove()
        gone.remove()
        gone.remove()  # a second remove() does nothing

    def child_hooks(model: Any, log: list, index: dict) -> None:
        first = _get(model, "0")
        first.register_forward_hook(lambda m, args, out: out * -1.0)
        first.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
        for path in dict.fromkeys(index.values()):
            _get(model, path).register_forward_hook(bind(logging("post"), log, index))

    return [
        (
            "two pre-hooks and two forward hooks on every module",
            "Pre-hooks run just before forward, forward hooks just after it, in registration order; "
            "submodules called inside forward run their own hooks (call them as layer(x), which goes "
            "through __call__). A pre-hook receives (module, args), a forward hook (module, args, output), "
            "with args the tuple of positional inputs.",
            every_module,
        ),
        (
            "three chained pre-hooks: (x+1,), a bare tensor x*3, None",
            "Each pre-hook sees the args the previous one returned; a tuple replaces args, a single "
            "non-tuple value is wrapped as (value,), None leaves args unchanged; the forward hook receives "
            "the final args.",
            chained_pre,
        ),
        (
            "chained forward hooks: out+10, None, out*2",
            "Forward hooks run in registration order, each seeing the output the previous one returned; "
            "None leaves the output unchanged, anything else replaces it, and __call__ returns the final output.",
            chained_post,
        ),
        (
            "hooks [A, B, A] with the third handle removed, and a removed forward hook",
            "handle.remove() must unregister exactly the hook registered with that handle (the same "
            "function registered twice is two registrations: removing the second keeps the order [A, B]); "
            "a second remove() does nothing.",
            removed,
        ),
        (
            "hooks on a child that rewrite its input and output",
            "A child's hooks run when the parent's forward calls the child; what they return changes "
            "what the parent sees.",
            child_hooks,
        ),
    ]


@exercise(
    "mini_module_hooks",
    chapter=CHAPTER,
    signature=(
        "class MiniModuleHooks(MiniModuleState): __call__(*args, **kwargs), register_forward_pre_hook(hook), "
        "register_forward_hook(hook) -> handle with .remove()"
    ),
    summary="__call__ running forward pre-hooks (may replace the args) and forward hooks (may replace the "
    "output) in registration order, with removable handles",
    reference=RefMiniModule,
)
def check_mini_module_hooks(t: Tester) -> None:
    """Plain calls with kwargs, hooks on every module, chained replacements, removal, child hooks."""
    cls = _as_class(t, "MiniModuleHooks")
    _require_registration(t, cls)
    zoo = _zoo(cls)
    x = torch.linspace(-1.0, 1.0, 6, dtype=F64).reshape(2, 3)
    ids = torch.tensor([[0, 3, 4], [1, 1, 2]])
    for desc, build, inp, kwargs in (
        (
            "Linear(3, 2) called with a keyword argument scale=2.0",
            lambda z: z.Linear(3, 2, seed=4),
            x,
            {"scale": 2.0},
        ),
        ("Seq(Linear, Tanh, Linear)", _hook_models, x, {}),
        ("Net (shared block called twice, tied head)", lambda z: z.Net(), ids, {}),
    ):
        case = f"{desc}, no hooks"
        mine = _run(t, case, "building the model", lambda build=build: build(zoo))
        theirs = build(_TORCH)
        got = _run(
            t,
            case,
            f"model(x{', scale=2.0' if kwargs else ''})",
            lambda mine=mine, inp=inp, kwargs=kwargs: mine(inp, **kwargs),
        )
        t.compare(case, "model(x)", got, theirs(inp, **kwargs))
    for name, hint, setup in _hook_scenarios():
        builders = [("Seq(Linear, Tanh, Linear)", _hook_models, x)]
        if setup.__name__ == "every_module":
            builders.append(("Net (shared block called twice)", lambda z: z.Net(), ids))
        for desc, build, inp in builders:
            case = f"{desc}, {name}"
            mine = _run(t, case, "building the model", lambda build=build: build(zoo))
            theirs = build(_TORCH)
            paths = _paths(theirs)
            out_r, log_r = _call_log(t, case, theirs, paths, inp, setup, learner=False)
            out_m, log_m = _call_log(t, case, mine, paths, inp, setup, learner=True, hint=hint)
            if log_m != log_r:
                first = next(
                    (i for i, (a, b) in enumerate(zip(log_m, log_r, strict=False)) if a != b),
                    min(len(log_m), len(log_r)),
                )
                show_m = log_m[first] if first < len(log_m) else "nothing"
                show_r = log_r[first] if first < len(log_r) else "nothing"
                t.fail(
                    case,
                    f"hook call {first + 1} was {show_m}, but with nn.Module it is {show_r} "
                    f"(entries: module, hook, described arguments). {hint}",
                )
            t.compare(case, "output", out_m, out_r)
    # handles: the object returned must have remove(), and a removed hook is gone for good
    case = "a handle's remove() on a forward hook that counts calls"
    mine = _run(t, case, "building the model", lambda: _hook_models(zoo))
    calls: list[int] = []
    handle = _run(
        t,
        case,
        "model.register_forward_hook(hook)",
        lambda: mine.register_forward_hook(lambda m, a, o: calls.append(1)),
    )
    if not callable(getattr(handle, "remove", None)):
        t.fail(
            case,
            f"register_forward_hook returned {_token(handle)}; it should return a handle with a remove() method.",
        )
    _run(t, case, "model(x)", lambda: mine(x))
    _run(t, case, "handle.remove()", handle.remove)
    _run(t, case, "model(x)", lambda: mine(x))
    if len(calls) != 1:
        t.fail(
            case,
            f"the hook ran {len(calls)} times over two calls with remove() between them; it should run once.",
        )
    t.ok(case, "remove()")
