"""Chapter 07 batteries: MiniModule written in other styles passes, planted mistakes are named.

The correct implementations are (1) the course's reference, one class with recursive
generators, and (2) a staged implementation in another style: explicit stacks instead of
recursion, hooks kept in lists of entry objects, a state dict built from a module walk.
Each planted mistake is a subclass of the staged style that overrides one method the way
a learner gets it wrong, and must be rejected with the sentence that names the mistake.
"""

from __future__ import annotations

import time
from collections import namedtuple
from typing import Any

import pytest
import torch
from torch import nn

import course_utils as cu
from course_utils.checks import ch07_module_internals as ch07

SEEDS = range(20)
IDS = [
    "mini_module_registration",
    "mini_module_traversal",
    "mini_module_state_dict",
    "mini_module_hooks",
]


# =====================================================================================
# A second correct style, in four stages
# =====================================================================================
Keys = namedtuple("Keys", ["missing_keys", "unexpected_keys"])


class LoopModule:
    """Registration with a table lookup by kind."""

    def __init__(self) -> None:
        vars(self).update(
            training=True,
            _parameters={},
            _buffers={},
            _non_persistent_buffers_set=set(),
            _modules={},
        )

    def __setattr__(self, name: str, value: Any) -> None:
        d = vars(self)
        if isinstance(value, LoopModule) and name in d.get("_parameters", {}):
            raise TypeError(f"{name} is a parameter: assign a Parameter or None")
        if isinstance(value, nn.Parameter | LoopModule):
            table = "_parameters" if isinstance(value, nn.Parameter) else "_modules"
            if table not in d:
                raise AttributeError(f"cannot assign {name} before __init__")
            for other in ("_parameters", "_buffers", "_modules"):
                if other != table:
                    d[other].pop(name, None)
            d["_non_persistent_buffers_set"].discard(name)
            d.pop(name, None)
            if table == "_parameters":
                self.register_parameter(name, value)
            else:
                d["_modules"][name] = value
            return
        for table, allowed in (
            ("_parameters", ()),
            ("_modules", ()),
            ("_buffers", (torch.Tensor,)),
        ):
            if name in d.get(table, {}):
                if value is not None and not isinstance(value, allowed):
                    raise TypeError(f"cannot assign {type(value).__name__} to {table[1:-1]} {name}")
                d[table][name] = value
                return
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = vars(self)
        for table in ("_parameters", "_buffers", "_modules"):
            if name in d.get(table, {}):
                return d[table][name]
        raise AttributeError(name)

    def __delattr__(self, name: str) -> None:
        d = vars(self)
        for table in ("_parameters", "_buffers", "_modules"):
            if name in d[table]:
                del d[table][name]
                d["_non_persistent_buffers_set"].discard(name)
                return
        object.__delattr__(self, name)

    def _new_name(self, name: str, table: str) -> None:
        if not isinstance(name, str):
            raise TypeError("names are strings")
        if "." in name or not name:
            raise KeyError(f"bad name {name!r}")
        if name in vars(self) or any(
            name in vars(self)[t] for t in ("_parameters", "_buffers", "_modules") if t != table
        ):
            raise KeyError(f"{name} exists")

    def register_parameter(self, name: str, param: Any) -> None:
        self._new_name(name, "_parameters")
        if param is not None and not isinstance(param, nn.Parameter):
            raise TypeError("a Parameter please")
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Any, persistent: bool = True) -> None:
        self._new_name(name, "_buffers")
        if tensor is not None and not torch.is_tensor(tensor):
            raise TypeError("a tensor please")
        self._buffers[name] = tensor
        (
            self._non_persistent_buffers_set.discard
            if persistent
            else self._non_persistent_buffers_set.add
        )(name)

    def add_module(self, name: str, module: Any) -> None:
        if module is not None and not isinstance(module, LoopModule):
            raise TypeError("a module please")
        self._new_name(name, "_modules")
        self._modules[name] = module


class LoopTraversal(LoopModule):
    """Traversal with explicit stacks and lists, no recursion."""

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        memo = set() if memo is None else memo
        out, stack = [], [(prefix, self)]
        while stack:
            path, module = stack.pop()
            if module in memo:
                continue
            if remove_duplicate:
                memo.add(module)
            out.append((path, module))
            kids = [
                (f"{path}.{n}" if path else n, m)
                for n, m in module._modules.items()
                if m is not None
            ]
            stack.extend(reversed(kids))
        return iter(out)

    def _members(self, table, prefix, recurse, remove_duplicate):
        seen, out = [], []
        walk = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for path, module in walk:
            for name, value in getattr(module, table).items():
                if value is None or any(value is s for s in seen):
                    continue
                if remove_duplicate:
                    seen.append(value)
                out.append((f"{path}.{name}" if path else name, value))
        return out

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        return self._members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse=True):
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        return self._members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse=True):
        return [b for _, b in self.named_buffers(recurse=recurse)]

    def named_children(self):
        out = []
        for name, m in self._modules.items():
            if m is not None and all(m is not o for _, o in out):
                out.append((name, m))
        return out

    def children(self):
        return [m for _, m in self.named_children()]

    def modules(self):
        return [m for _, m in self.named_modules()]

    def apply(self, fn):
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def to(self, dtype):
        with torch.no_grad():
            for p in self.parameters():
                if p.is_floating_point():
                    p.data = p.to(dtype)
        for m in self.modules():
            for k, b in list(m._buffers.items()):
                if b is not None and b.is_floating_point():
                    m._buffers[k] = b.to(dtype)
        return self


class LoopState(LoopTraversal):
    """state_dict from one walk that keeps repeated modules; load by key lookup."""

    def _local(self):
        out = {k: v for k, v in self._parameters.items() if v is not None}
        out.update(
            {
                k: v
                for k, v in self._buffers.items()
                if v is not None and k not in self._non_persistent_buffers_set
            }
        )
        return out

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        out = {} if destination is None else destination
        root = prefix[:-1] if prefix.endswith(".") else prefix
        for path, module in self.named_modules(prefix=root, remove_duplicate=False):
            for k, v in module._local().items():
                out[f"{path}.{k}" if path else k] = v if keep_vars else v.detach()
        return out

    def load_state_dict(self, state_dict, strict=True):
        missing, used, errors = [], set(), []
        for path, module in self.named_modules(remove_duplicate=False):
            for k, v in module._local().items():
                key = f"{path}.{k}" if path else k
                if key not in state_dict:
                    missing.append(key)
                elif state_dict[key].shape != v.shape:
                    errors.append(f"size mismatch for {key}")
                    used.add(key)
                else:
                    with torch.no_grad():
                        v.copy_(state_dict[key])
                    used.add(key)
        # a key under a None child is silently ignored, as nn.Module does
        none_children = {
            (f"{p}.{n}." if p else f"{n}.")
            for p, m in self.named_modules(remove_duplicate=False)
            for n, c in m._modules.items()
            if c is None
        }
        unexpected = [
            k
            for k in state_dict
            if k not in used and not any(k.startswith(c) for c in none_children)
        ]
        if strict and (missing or unexpected):
            errors.insert(0, f"missing {missing}, unexpected {unexpected}")
        if errors:
            raise RuntimeError("; ".join(errors))
        return Keys(missing, unexpected)


class _Entry:
    def __init__(self, hooks: list, fn) -> None:
        self.hooks, self.fn = hooks, fn

    def remove(self) -> None:
        if any(e is self for e in self.hooks):
            self.hooks[:] = [e for e in self.hooks if e is not self]


class LoopHooks(LoopState):
    """Hooks in lists of entry objects; the entry is the handle."""

    def __init__(self) -> None:
        super().__init__()
        self._pre = []
        self._post = []

    def register_forward_pre_hook(self, hook):
        entry = _Entry(self._pre, hook)
        self._pre.append(entry)
        return entry

    def register_forward_hook(self, hook):
        entry = _Entry(self._post, hook)
        self._post.append(entry)
        return entry

    def __call__(self, *args, **kwargs):
        for e in list(self._pre):
            new = e.fn(self, args)
            if new is not None:
                args = new if isinstance(new, tuple) else (new,)
        out = self.forward(*args, **kwargs)
        for e in list(self._post):
            new = e.fn(self, args, out)
            out = out if new is None else new
        return out


CORRECT = {"reference": ch07.RefMiniModule, "loops": LoopHooks}


@pytest.mark.parametrize("style", list(CORRECT))
@pytest.mark.parametrize("exercise_id", IDS)
def test_correct_styles_pass(style, exercise_id):
    cls = CORRECT[style]
    for seed in SEEDS:
        report = cu.check(exercise_id, cls, strict=True, seed=seed)
        assert report.passed


def test_stages_pass_on_their_own_class():
    for exercise_id, cls in zip(
        IDS, (LoopModule, LoopTraversal, LoopState, LoopHooks), strict=True
    ):
        assert cu.check(exercise_id, cls, strict=True).passed


def test_exercises_are_listed():
    listed = [e.id for e in cu.exercises("07")]
    assert listed == IDS
    assert cu.reference("mini_module_hooks") is ch07.RefMiniModule


# =====================================================================================
# Planted mistakes: one overridden method each
# =====================================================================================
class ParamInDict(LoopHooks):
    def __setattr__(self, name, value):
        if isinstance(value, nn.Parameter):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)


class GetattrKeyError(LoopHooks):
    def __getattr__(self, name):
        d = vars(self)
        if name in d.get("_buffers", {}):
            return d["_buffers"][name]
        if name in d.get("_modules", {}):
            return d["_modules"][name]
        return d["_parameters"][name]


class GetattrRecursion(LoopHooks):
    def __getattr__(self, name):
        for table in (self._parameters, self._buffers, self._modules):
            if name in table:
                return table[name]
        raise AttributeError(name)


class TensorBecomesBuffer(LoopHooks):
    def __setattr__(self, name, value):
        if (
            torch.is_tensor(value)
            and not isinstance(value, nn.Parameter)
            and "_buffers" in vars(self)
            and name not in self._parameters
        ):
            self._buffers[name] = value
        else:
            super().__setattr__(name, value)


class NoTypeCheck(LoopHooks):
    def __setattr__(self, name, value):
        if "_parameters" in vars(self) and name in self._parameters and torch.is_tensor(value):
            self._parameters[name] = value
        else:
            super().__setattr__(name, value)


class StaleDictEntry(LoopHooks):
    def __setattr__(self, name, value):
        if isinstance(value, nn.Parameter) and "_parameters" in vars(self):
            self._parameters[name] = value  # never removed from __dict__ or the other tables
        else:
            super().__setattr__(name, value)


class DotAllowed(LoopHooks):
    def register_parameter(self, name, param):
        if param is not None and not isinstance(param, nn.Parameter):
            raise TypeError("a Parameter please")
        if name in vars(self):
            raise KeyError(name)
        self._parameters[name] = param


class StickyNonPersistent(LoopHooks):
    def register_buffer(self, name, tensor, persistent=True):
        self._new_name(name, "_buffers")
        if tensor is not None and not torch.is_tensor(tensor):
            raise TypeError("a tensor please")
        self._buffers[name] = tensor
        if not persistent:
            self._non_persistent_buffers_set.add(name)


class NoTrainingFlag(LoopHooks):
    def __init__(self):
        super().__init__()
        del vars(self)["training"]


class BareNames(LoopHooks):
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        return [
            (n.rsplit(".", 1)[-1], p)
            for n, p in super().named_parameters(prefix, recurse, remove_duplicate)
        ]


class NoRecursion(LoopHooks):
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        return super().named_parameters(prefix, False, remove_duplicate)


class SharedTwice(LoopHooks):
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        out = []
        walk = (
            self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
            if recurse
            else [(prefix, self)]
        )
        for path, m in walk:
            for k, v in m._parameters.items():
                if v is not None:
                    out.append((f"{path}.{k}" if path else k, v))
        return out


class ChildrenFirst(LoopHooks):
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        own = [
            (f"{prefix}.{k}" if prefix else k, v)
            for k, v in self._parameters.items()
            if v is not None
        ]
        if not recurse:
            return own
        kids = []
        for name, child in self.named_children():
            kids += child.named_parameters(
                f"{prefix}.{name}" if prefix else name, True, remove_duplicate
            )
        out, seen = [], []
        for n, v in kids + own:
            if not remove_duplicate or all(v is not s for s in seen):
                seen.append(v)
                out.append((n, v))
        return out


class LeadingDot(LoopHooks):
    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        return [
            ("." + n if not prefix else n, p)
            for n, p in super().named_parameters(prefix, recurse, remove_duplicate)
        ]


class PersistentOnlyBuffers(LoopHooks):
    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        return [
            (n, b)
            for n, b in super().named_buffers(prefix, recurse, remove_duplicate)
            if n.rsplit(".", 1)[-1] != "scratch"
        ]


class ShallowTrain(LoopHooks):
    def train(self, mode=True):
        self.training = mode
        return self


class EvalReturnsNone(LoopHooks):
    def eval(self):
        self.train(False)


class ApplyPreOrder(LoopHooks):
    def apply(self, fn):
        fn(self)
        for m in self.children():
            m.apply(fn)
        return self


class ZeroGradOldDefault(LoopHooks):
    def zero_grad(self, set_to_none=False):
        super().zero_grad(set_to_none)


class ZeroGradNewTensors(LoopHooks):
    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if p.grad is not None:
                p.grad = None if set_to_none else torch.zeros_like(p)


class ToNewParameters(LoopHooks):
    def to(self, dtype):
        for m in self.modules():
            for k, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[k] = nn.Parameter(p.detach().to(dtype))
            for k, b in list(m._buffers.items()):
                if b is not None and b.is_floating_point():
                    m._buffers[k] = b.to(dtype)
        return self


class ToConvertsIntegers(LoopHooks):
    def to(self, dtype):
        super().to(dtype)
        for m in self.modules():
            for k, b in list(m._buffers.items()):
                m._buffers[k] = b.to(dtype)
        return self


class StateWithNonPersistent(LoopHooks):
    def _local(self):
        out = {k: v for k, v in self._parameters.items() if v is not None}
        out.update({k: v for k, v in self._buffers.items() if v is not None})
        return out


class StateNotDetached(LoopHooks):
    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        return super().state_dict(destination=destination, prefix=prefix, keep_vars=True)


class StateCloned(LoopHooks):
    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        sd = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        return sd if keep_vars else {k: v.clone() for k, v in sd.items()}


class StateFromNamedParameters(LoopHooks):
    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        root = prefix[:-1] if prefix.endswith(".") else prefix
        out = {}
        for path, m in self.named_modules(prefix=root):
            for k, v in m._local().items():
                if all(v is not o for o in out.values()):
                    out[f"{path}.{k}" if path else k] = v if keep_vars else v.detach()
        return out


class StateParamsThenBuffers(LoopHooks):
    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        sd = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        params = {
            k: v
            for k, v in sd.items()
            if isinstance(ch07._get(self, k[len(prefix) :]), nn.Parameter)
        }
        return {**params, **{k: v for k, v in sd.items() if k not in params}}


class StateNoBuffers(LoopHooks):
    def _local(self):
        return {k: v for k, v in self._parameters.items() if v is not None}


class StrictIgnoresUnexpected(LoopHooks):
    def load_state_dict(self, state_dict, strict=True):
        result = super().load_state_dict(state_dict, strict=False)
        if strict and result.missing_keys:
            raise RuntimeError(f"missing {result.missing_keys}")
        return result


class LoadReplaces(LoopHooks):
    def load_state_dict(self, state_dict, strict=True):
        result = super().load_state_dict(state_dict, strict)
        for path, m in self.named_modules(remove_duplicate=False):
            for k, p in list(m._parameters.items()):
                key = f"{path}.{k}" if path else k
                if p is not None and key in state_dict:
                    m._parameters[k] = nn.Parameter(state_dict[key].clone())
        return result


class LoadAliases(LoopHooks):
    def load_state_dict(self, state_dict, strict=True):
        result = super().load_state_dict(state_dict, strict)
        for path, m in self.named_modules(remove_duplicate=False):
            for k, v in m._local().items():
                key = f"{path}.{k}" if path else k
                if key in state_dict:
                    v.data = state_dict[key]
        return result


class LoadPlainTuple(LoopHooks):
    def load_state_dict(self, state_dict, strict=True):
        return tuple(super().load_state_dict(state_dict, strict))


class LoadNonPersistent(LoopHooks):
    def load_state_dict(self, state_dict, strict=True):
        state = dict(state_dict)
        for path, m in self.named_modules(remove_duplicate=False):
            for k in m._non_persistent_buffers_set:
                key = f"{path}.{k}" if path else k
                if key in state and state[key].shape == m._buffers[k].shape:
                    m._buffers[k].copy_(state.pop(key))
        return super().load_state_dict(state, strict)


class LoadVagueError(LoopHooks):
    def load_state_dict(self, state_dict, strict=True):
        try:
            return super().load_state_dict(state_dict, strict)
        except RuntimeError:
            raise RuntimeError("the state dict does not fit") from None


class HooksAfterForwardBefore(LoopHooks):
    def __call__(self, *args, **kwargs):
        for e in list(self._pre):
            new = e.fn(self, args)
            if new is not None:
                args = new if isinstance(new, tuple) else (new,)
        for e in list(self._post):
            e.fn(self, args, None)
        return self.forward(*args, **kwargs)


class PreHookResultIgnored(LoopHooks):
    def __call__(self, *args, **kwargs):
        for e in list(self._pre):
            e.fn(self, args)
        out = self.forward(*args, **kwargs)
        for e in list(self._post):
            new = e.fn(self, args, out)
            out = out if new is None else new
        return out


class PreHookNotWrapped(LoopHooks):
    def __call__(self, *args, **kwargs):
        for e in list(self._pre):
            new = e.fn(self, args)
            if new is not None:
                args = new
        out = self.forward(*args, **kwargs)
        for e in list(self._post):
            new = e.fn(self, args, out)
            out = out if new is None else new
        return out


class PostHookResultIgnored(LoopHooks):
    def __call__(self, *args, **kwargs):
        for e in list(self._pre):
            new = e.fn(self, args)
            if new is not None:
                args = new if isinstance(new, tuple) else (new,)
        out = self.forward(*args, **kwargs)
        for e in list(self._post):
            e.fn(self, args, out)
        return out


class HooksLifo(LoopHooks):
    def register_forward_pre_hook(self, hook):
        entry = _Entry(self._pre, hook)
        self._pre.insert(0, entry)
        return entry

    def register_forward_hook(self, hook):
        entry = _Entry(self._post, hook)
        self._post.insert(0, entry)
        return entry


class _FnHandle:
    def __init__(self, hooks, fn):
        self.hooks, self.fn = hooks, fn

    def remove(self):
        if self.fn in self.hooks:
            self.hooks.remove(self.fn)


class RemoveByFunction(LoopHooks):
    """Hooks kept as bare functions; remove() drops the first equal function."""

    def register_forward_pre_hook(self, hook):
        self._pre_fns = vars(self).get("_pre_fns", [])
        self._pre_fns.append(hook)
        return _FnHandle(self._pre_fns, hook)

    def register_forward_hook(self, hook):
        self._post_fns = vars(self).get("_post_fns", [])
        self._post_fns.append(hook)
        return _FnHandle(self._post_fns, hook)

    def __call__(self, *args, **kwargs):
        for fn in list(vars(self).get("_pre_fns", [])):
            new = fn(self, args)
            if new is not None:
                args = new if isinstance(new, tuple) else (new,)
        out = self.forward(*args, **kwargs)
        for fn in list(vars(self).get("_post_fns", [])):
            new = fn(self, args, out)
            out = out if new is None else new
        return out


class PostHookOriginalArgs(LoopHooks):
    def __call__(self, *args, **kwargs):
        original = args
        for e in list(self._pre):
            new = e.fn(self, args)
            if new is not None:
                args = new if isinstance(new, tuple) else (new,)
        out = self.forward(*args, **kwargs)
        for e in list(self._post):
            new = e.fn(self, original, out)
            out = out if new is None else new
        return out


class KwargsDropped(LoopHooks):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args)


MISTAKES = [
    ("mini_module_registration", ParamInDict, r"stored in the instance __dict__"),
    ("mini_module_registration", GetattrKeyError, r"must raise AttributeError for a missing name"),
    ("mini_module_registration", GetattrRecursion, r"calls __getattr__ again, forever"),
    ("mini_module_registration", TensorBecomesBuffer, r"only register_buffer makes a buffer"),
    (
        "mini_module_registration",
        NoTypeCheck,
        r"should raise TypeError.*wrap the tensor in nn.Parameter",
    ),
    ("mini_module_registration", StaleDictEntry, r"moves it out of __dict__"),
    ("mini_module_registration", DotAllowed, r"name with a dot"),
    (
        "mini_module_registration",
        StickyNonPersistent,
        r"removes its name from _non_persistent_buffers_set",
    ),
    ("mini_module_registration", NoTrainingFlag, r"a fresh module is in training mode"),
    ("mini_module_traversal", BareNames, r"lack their module's path"),
    ("mini_module_traversal", NoRecursion, r"recurse into the submodules"),
    ("mini_module_traversal", SharedTwice, r"a shared parameter must be listed once"),
    ("mini_module_traversal", ChildrenFirst, r"Same names, different order.*pre-order"),
    ("mini_module_traversal", LeadingDot, r"leading dot"),
    ("mini_module_traversal", PersistentOnlyBuffers, r"non-persistent buffers are missing"),
    ("mini_module_traversal", ShallowTrain, r"on every child, recursively"),
    ("mini_module_traversal", EvalReturnsNone, r"must return the module itself"),
    ("mini_module_traversal", ApplyPreOrder, r"children first .* itself last"),
    ("mini_module_traversal", ZeroGradOldDefault, r"default since PyTorch 2.0"),
    ("mini_module_traversal", ZeroGradNewTensors, r"zeroed in place"),
    ("mini_module_traversal", ToNewParameters, r"is a new object: convert a parameter in place"),
    ("mini_module_traversal", ToConvertsIntegers, r"Integer buffers"),
    (
        "mini_module_state_dict",
        StateWithNonPersistent,
        r"non-persistent buffers \(persistent=False\)",
    ),
    ("mini_module_state_dict", StateNotDetached, r"detached tensors"),
    ("mini_module_state_dict", StateCloned, r"does not share memory"),
    ("mini_module_state_dict", StateFromNamedParameters, r"shared or tied tensor under every name"),
    ("mini_module_state_dict", StateParamsThenBuffers, r"Same keys, different order"),
    ("mini_module_state_dict", StateNoBuffers, r"buffers are missing"),
    ("mini_module_state_dict", StrictIgnoresUnexpected, r"should raise RuntimeError.*strict mode"),
    ("mini_module_state_dict", LoadReplaces, r"is a new object: copy into the existing tensors"),
    ("mini_module_state_dict", LoadAliases, r"do not alias"),
    ("mini_module_state_dict", LoadPlainTuple, r"named tuple"),
    ("mini_module_state_dict", LoadNonPersistent, r"non-persistent buffer's name is unexpected"),
    ("mini_module_state_dict", LoadVagueError, r"does not name"),
    ("mini_module_hooks", HooksAfterForwardBefore, r"forward hooks just after it"),
    (
        "mini_module_hooks",
        PreHookResultIgnored,
        r"Each pre-hook sees the args the previous one returned",
    ),
    ("mini_module_hooks", PreHookNotWrapped, r"non-tuple value is wrapped"),
    (
        "mini_module_hooks",
        PostHookResultIgnored,
        r"each seeing the output the previous one returned",
    ),
    ("mini_module_hooks", HooksLifo, r"in registration order"),
    ("mini_module_hooks", RemoveByFunction, r"keeps the order \[A, B\]"),
    ("mini_module_hooks", PostHookOriginalArgs, r"the forward hook receives the final args"),
    ("mini_module_hooks", KwargsDropped, r"scale=2.0.*model\(x\)"),
]


@pytest.mark.parametrize(
    ("exercise_id", "cls", "pattern"), MISTAKES, ids=[f"{e}-{c.__name__}" for e, c, _ in MISTAKES]
)
@pytest.mark.forbidden_calls_allowed
def test_planted_mistake_is_named(exercise_id, cls, pattern):
    for seed in (0, 1, 7):
        with pytest.raises(cu.CheckFailure, match=pattern):
            cu.check(exercise_id, cls, strict=True, seed=seed)


@pytest.mark.parametrize(
    ("exercise_id", "cls", "pattern"), MISTAKES[:9], ids=[c.__name__ for _, c, _ in MISTAKES[:9]]
)
def test_registration_mistakes_break_later_stages_too(exercise_id, cls, pattern):
    """A broken stage 1 never passes a later stage by accident."""
    with pytest.raises(cu.CheckFailure):
        cu.check("mini_module_state_dict", cls, strict=True)


def test_instance_instead_of_class():
    with pytest.raises(cu.CheckFailure, match="pass the class itself"):
        cu.check("mini_module_traversal", LoopHooks(), strict=True)


class Stub:
    def __init__(self):
        raise NotImplementedError("MiniModule.__init__: not written yet")


class HookStub(LoopState):
    def register_forward_pre_hook(self, hook):
        raise NotImplementedError

    def register_forward_hook(self, hook):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        raise NotImplementedError


@pytest.mark.parametrize("exercise_id", IDS)
def test_stub_is_pending_in_learn_mode_and_fails_in_strict(exercise_id, capsys):
    report = cu.check(exercise_id, Stub, strict=False)
    assert report.status == "pending"
    assert "not implemented" in capsys.readouterr().out
    with pytest.raises(cu.CheckFailure, match="not implemented yet"):
        cu.check(exercise_id, Stub, strict=True)


def test_later_stage_stub_is_pending_while_earlier_stages_pass():
    assert cu.check("mini_module_state_dict", HookStub, strict=True).passed
    assert cu.check("mini_module_hooks", HookStub, strict=False).status == "pending"


def test_checks_do_not_touch_the_global_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for exercise_id in IDS:
        cu.check(exercise_id, LoopHooks, strict=True)
    assert torch.equal(torch.rand(3), expected)


def test_timing_report(capsys):
    """Not a timed test: prints each check's seconds on the reference and the loop style."""
    for exercise_id in IDS:
        for name, cls in CORRECT.items():
            start = time.perf_counter()
            cu.check(exercise_id, cls, strict=True)
            print(f"{exercise_id:28s} {name:10s} {time.perf_counter() - start:.3f} s")
