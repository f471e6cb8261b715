"""The public API is typed (every parameter and return annotated, choices as ``Literal``), its
docstrings have an ``Args:`` section, and ``py.typed`` ships with the package."""

import dataclasses
import inspect
import pathlib
import typing

import pytest
import torch
from torch import nn

import gkl_kernels
from gkl_kernels import compat
from gkl_kernels import validation as check
from gkl_kernels.options import GKLOptions

pytestmark = pytest.mark.torch_only

ROOT = pathlib.Path(__file__).resolve().parents[1]
# parameters with a fixed set of values, and the values the code accepts
CHOICES = {"reduction": check.REDUCTIONS, "normalize": check.NORMALIZERS,
           "backend": check.BACKENDS, "dot_precision": check.DOT_PRECISIONS,
           "weights_kind": check.WEIGHT_KINDS, "name": compat.CONSISTENCY_NAMES}
EXPECTED = {"gkl_loss", "jsd_loss", "pairwise_wmse", "fused_linear_gkl", "fused_linear_jsd",
            "vocab_parallel_gkl_loss",
            "GKLLoss.__init__", "GKLLoss.forward", "FusedLinearGKLLoss.__init__",
            "FusedLinearGKLLoss.forward", "ClassPrior.__init__", "ClassPrior.update",
            "ClassPrior.end_epoch", "ClassPrior.matrix", "ClassPrior.state_dict",
            "ClassPrior.load_state_dict", "compat.dkl_loss", "compat.ikl_loss",
            "compat.adv_dkl_loss", "compat.consistency_loss", "compat.ConsistencyLoss.forward"}


def _public_objects():
    """``(qualified name, object)`` of ``__all__`` and of the ``compat`` module's own names."""
    for name in gkl_kernels.__all__:
        obj = getattr(gkl_kernels, name)
        if not inspect.ismodule(obj):
            yield name, obj
    for name, obj in vars(compat).items():
        if (not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                and obj.__module__ == compat.__name__):
            yield f"compat.{name}", obj


def _public_callables():
    """``(qualified name, function, class or None)``: functions, and each class's own
    ``__init__``, ``forward`` and public methods."""
    for name, obj in _public_objects():
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (attr == "__init__" or not attr.startswith("_")):
                    yield f"{name}.{attr}", member, obj
        else:
            yield name, obj, None


CALLABLES = {name: (function, owner) for name, function, owner in _public_callables()}


def _named_parameters(function):
    return [p for p in inspect.signature(function).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _literal_values(annotation):
    """The values of the ``Literal`` in ``annotation`` (also inside ``Optional``), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            values = _literal_values(arg)
            if values is not None:
                return values
    return None


def test_every_public_callable_is_found():
    assert EXPECTED <= set(CALLABLES), sorted(EXPECTED - set(CALLABLES))


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_parameters_and_return_annotated(name):
    function, _ = CALLABLES[name]
    signature = inspect.signature(function)
    missing = [p.name for p in signature.parameters.values()
               if p.name != "self" and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without annotation: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, \
        f"{name}: no return annotation"
    typing.get_type_hints(function)  # the annotations resolve


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_docstring_has_args(name):
    function, owner = CALLABLES[name]
    parameters = _named_parameters(function)
    if not parameters:
        return
    doc = function.__doc__ or ""
    if function.__name__ == "__init__":  # the constructor may be documented on the class
        doc = (owner.__doc__ or "") + doc
    assert "Args:" in doc, f"{name}: its docstring has no Args: section"
    undocumented = [p.name for p in parameters if p.name not in doc]
    assert not undocumented, f"{name}: parameters not in the docstring: {undocumented}"
    if inspect.signature(function).return_annotation not in (None, inspect.Signature.empty):
        assert "Returns:" in doc, f"{name}: its docstring has no Returns: section"


@pytest.mark.parametrize("name", sorted(CALLABLES))
def test_choice_parameters_are_literal(name):
    function, _ = CALLABLES[name]
    hints = typing.get_type_hints(function)
    for parameter in _named_parameters(function):
        if parameter.name not in CHOICES:
            continue
        values = _literal_values(hints.get(parameter.name))
        assert values is not None, f"{name}: {parameter.name} is not a Literal"
        assert values == set(CHOICES[parameter.name]), \
            f"{name}: {parameter.name} Literal {values} != accepted {CHOICES[parameter.name]}"


def test_checks_can_fail():
    """The helpers above flag an untyped, undocumented function and a ``str`` choice."""
    def untyped(student, reduction="mean"):
        return student

    assert inspect.signature(untyped).parameters["student"].annotation is inspect.Parameter.empty
    assert _literal_values(str) is None
    assert _literal_values(typing.Optional[gkl_kernels.functional.WeightsKind]) == \
        set(check.WEIGHT_KINDS)


@pytest.mark.parametrize("module", [gkl_kernels.GKLLoss, gkl_kernels.FusedLinearGKLLoss,
                                    compat.ConsistencyLoss])
def test_forward_has_its_own_docstring(module):
    # help() shows nn.Module.forward's generic text when forward has no docstring
    assert module.forward.__doc__ and module.forward.__doc__ != nn.Module.forward.__doc__
    assert "Args:" in module.forward.__doc__


def test_py_typed_is_shipped():
    assert (ROOT / "gkl_kernels" / "py.typed").is_file()
    assert pathlib.Path(gkl_kernels.__file__).with_name("py.typed").is_file()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(ROOT / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data.get("gkl_kernels", []), package_data


# ------------------------------------------------------------------ one option list

OPTION_FIELDS = {option.name: option for option in dataclasses.fields(GKLOptions)}
# the public callables that take GKLOptions' options as keyword arguments; pairwise_wmse sums
# its rows by default (its own documented default)
OPTION_TAKERS = ("gkl_loss", "GKLLoss.__init__", "vocab_parallel_gkl_loss", "pairwise_wmse",
                 "jsd_loss", "fused_linear_jsd")
JSD_ONLY = {"beta"}  # the generalized JSD's own option: the GKL entry points do not take it
OWN_DEFAULTS = {("pairwise_wmse", "reduction"): "sum"}


def _option_parameters(name):
    function = CALLABLES[name][0]
    return [p for p in _named_parameters(function) if p.name in OPTION_FIELDS]


@pytest.mark.parametrize("name", OPTION_TAKERS)
def test_option_parameters_follow_the_option_list(name):
    """Each option a public callable takes has ``GKLOptions``' type and default, and its
    docstring names it."""
    parameters = _option_parameters(name)
    assert parameters, f"{name} takes no option of GKLOptions"
    hints = typing.get_type_hints(CALLABLES[name][0])
    option_hints = typing.get_type_hints(GKLOptions)
    doc = inspect.getdoc(CALLABLES[name][1] or CALLABLES[name][0]) if name.endswith(
        "__init__") else inspect.getdoc(CALLABLES[name][0])
    for parameter in parameters:
        expected = OWN_DEFAULTS.get((name, parameter.name), OPTION_FIELDS[parameter.name].default)
        assert parameter.default == expected and type(parameter.default) is type(expected), \
            f"{name}({parameter.name}=...): default {parameter.default!r}, the list's {expected!r}"
        assert hints[parameter.name] == option_hints[parameter.name], \
            f"{name}({parameter.name}): type {hints[parameter.name]}, the list's " \
            f"{option_hints[parameter.name]}"
        assert parameter.name in doc, f"{name}'s docstring does not name {parameter.name}"


def test_gkl_loss_and_the_module_take_every_option():
    """``gkl_loss`` and ``GKLLoss`` take every option of the list, and nothing passes them on
    unchecked: a bad value of each is refused at the entry."""
    for name in ("gkl_loss", "GKLLoss.__init__"):
        assert {p.name for p in _option_parameters(name)} == set(OPTION_FIELDS) - JSD_ONLY, name
    for name in ("jsd_loss", "fused_linear_jsd"):
        assert JSD_ONLY <= {p.name for p in _option_parameters(name)}, name
    bad = {"gamma": -1.0, "temperature": 0.0, "weight_temperature": -2.0, "mse_weight": "x",
           "ce_weight": float("nan"), "normalize": "rows", "symmetric": 1, "reduction": "avg",
           "backend": "cuda", "check_values": None, "block_c": 3, "dot_precision": "fp16",
           "sync_normalizer": "yes", "ignore_index": 1.5}
    assert set(bad) == set(OPTION_FIELDS) - {"process_group"} - JSD_ONLY
    for option, value in bad.items():
        with pytest.raises((TypeError, ValueError), match=option):
            gkl_kernels.GKLLoss(**{option: value})
    for value in (-0.5, 2.0, "half"):
        with pytest.raises((TypeError, ValueError), match="beta"):
            gkl_kernels.jsd_loss(torch.zeros(2, 3), torch.zeros(2, 3), beta=value)


def test_a_wrong_option_default_is_reported(monkeypatch):
    """The agreement test can fail: a signature whose default differs from the list."""
    def loss(student, *, gamma: float = 2.0):
        """Args: gamma."""
    monkeypatch.setitem(CALLABLES, "gkl_loss", (loss, None))
    with pytest.raises(AssertionError, match="gamma"):
        test_option_parameters_follow_the_option_list("gkl_loss")
