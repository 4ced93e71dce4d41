"""Check a training config before anything is built: its group choices, its keys, types and ranges.

:func:`check_group_choices` checks the command line's group choices (``scheduler=fastface``,
``+experiment=r100_ms1mv3``) before Hydra composes the config; :func:`validate_config` checks the composed config.
Each config group with a ``_target_`` (``trainer``, ``model``, ``data``, ``scheduler``) is checked against the
target's parameters: unknown keys, and values whose type cannot match the annotation (``trainer.max_epochs=abc``
for ``Optional[int]``, ``trainer.precision=17`` for the Literal of precisions). Annotations that cannot be checked
(classes, callables, ``Any``) are accepted. Then the ranges: the data module and the scheduler are constructed
(their constructors only check their arguments: no data is read), the model's arguments go through
:meth:`FaceRecognitionModule.check_arguments`, and the keys of ``conf/train.yaml`` through
:mod:`fastface_pl.argument_checks`. No data, model or trainer is built here.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from importlib import resources
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastface_pl.data.datamodule import ACCEPTED_LAYOUTS
from fastface_pl.errors import UsageError
from fastface_pl.models.module import CLASSIFIERS
from fastface_pl.argument_checks import check_bool, check_int

__all__ = ["check_arguments", "check_group_choices", "describe_type", "require_dataset", "validate_config",
           "value_matches"]

GROUPS = ("model", "classifier", "data", "scheduler", "trainer", "experiment")


def _origin(tp: Any) -> Any:
    return typing.get_origin(tp)


def value_matches(value: Any, tp: Any) -> Optional[bool]:
    """``True``/``False`` when ``value`` does/does not fit the annotation ``tp``; ``None`` when it cannot be told."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    origin = _origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        results = [value_matches(value, arg) for arg in typing.get_args(tp)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    container = origin or tp
    if container in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        return isinstance(value, (list, tuple)) or None
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict) or None
    if isinstance(tp, type):
        return True if isinstance(value, tp) else None
    return None


def describe_type(tp: Any) -> str:
    """A short human name of an annotation: ``an integer or null``, ``one of '32-true', '16-mixed', …``."""
    origin = _origin(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        literals = [a for arg in typing.get_args(tp) if _origin(arg) is typing.Literal for a in typing.get_args(arg)]
        others = [describe_type(arg) for arg in typing.get_args(tp) if _origin(arg) is not typing.Literal]
        parts = ([f"one of {', '.join(repr(v) for v in literals)}"] if literals else []) + others
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return f"one of {', '.join(repr(v) for v in typing.get_args(tp))}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _signature(target: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    function = target.__init__ if inspect.isclass(target) else target
    parameters = dict(inspect.signature(function).parameters)
    parameters.pop("self", None)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # noqa: BLE001  (an annotation that does not evaluate: check the names only)
        hints = {}
    return parameters, hints


def check_arguments(section: Mapping[str, Any], target: Callable, prefix: str) -> list[str]:
    """Problems of ``section`` (a resolved, plain mapping) as the keyword arguments of ``target``; ``[]`` if none.

    Keys starting with ``_`` (Hydra's ``_target_``, ``_convert_`` …) are skipped.
    """
    parameters, hints = _signature(target)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    name = getattr(target, "__name__", str(target))
    problems = []
    for key, value in section.items():
        if key.startswith("_"):
            continue
        if key not in parameters or parameters[key].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                             inspect.Parameter.VAR_KEYWORD):
            if not takes_kwargs:
                known = ", ".join(k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL)
                problems.append(f"{prefix}.{key}: unknown key ({name} takes {known})")
            continue
        tp = hints.get(key, parameters[key].annotation)
        if value_matches(value, tp) is False:
            problems.append(f"{prefix}.{key}={value!r}: expected {describe_type(tp)}")
    return problems


def check_group_choices(overrides: Sequence[str], config_module: str = "fastface_pl.conf") -> None:
    """Raise :class:`UsageError` for a group choice of the command line that names no config file
    (``scheduler=fastfac``), listing the group's options as Hydra does; other overrides are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return  # a syntax error: Hydra words it
    conf = resources.files(config_module)
    for override in parsed:
        group = override.key_or_group
        if group not in GROUPS or override.is_delete() or "@" in (override.package or ""):
            continue
        options = sorted(p.name[:-5] for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml"))
        names = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                 else [override.get_value_element_as_str()])
        for name in names:
            if name not in options:
                listed = "".join(f"\n\t{option}" for option in options)
                raise UsageError(f"Could not find '{group}/{name}' (in {override.input_line})\n"
                                 f"Available options in '{group}':{listed}")


def require_dataset(cfg: DictConfig) -> None:
    """Raise :class:`UsageError` when the config names no dataset (``data.root`` unset)."""
    root = cfg.data.get("root")
    if root is None or str(root).strip() in ("", "???"):
        raise UsageError("no dataset given: this configuration needs data.root=/path/to/dataset (or the environment "
                         "variable FASTFACE_DATA_ROOT).\nAccepted layouts:\n" + ACCEPTED_LAYOUTS)


def _resolved(cfg: DictConfig, group: str, problems: list[str]) -> dict[str, Any]:
    section = {}
    for key in cfg[group]:
        if group == "trainer" and key == "default_root_dir":
            continue  # Hydra's run folder
        try:
            value = OmegaConf.select(cfg[group], str(key), throw_on_resolution_failure=True)
            section[str(key)] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except OmegaConfBaseException as err:
            problems.append(f"{group}.{key}: {str(err).splitlines()[0]}")
    return section


# the keys of conf/train.yaml and their checks
_TRAIN_KEYS: dict[str, Callable[[str, Any], Any]] = {
    "seed": lambda name, v: check_int(name, v, 0),
    "checkpoint_every_n_steps": lambda name, v: check_int(name, v, 1),
    "validate_at_end": check_bool,
    "plot": check_bool,
    "divergence.max_nonfinite_steps": lambda name, v: check_int(name, v, 1),
    "divergence.check_every_n_steps": lambda name, v: check_int(name, v, 1),
}


def _run_length_problems(trainer: Mapping[str, Any]) -> list[str]:
    """A run must train at least one step: ``max_epochs`` 0 (or ``max_steps`` 0) would end "completed" with no
    checkpoint."""
    problems = []
    for key, off in (("max_epochs", (None, -1)), ("max_steps", (None, -1))):
        value = trainer.get(key)
        if value not in off and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"trainer.{key}={value!r}: expected an int >= 1 (or -1: no limit); a run trains at "
                            "least one step")
    return problems


def _strategy_problems(trainer: Mapping[str, Any]) -> list[str]:
    """A strategy that starts the ranks from the launching process (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``
    and their ``_find_unused_parameters_*`` forms: Lightning's strategies with a ``start_method`` other than
    ``popen``) trains in processes that hand back no step count: the run would train, then end as a usage error
    with no results. ``ddp`` starts the ranks as new commands and trains the same way."""
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = trainer.get("strategy")
    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return []
    start_method = StrategyRegistry[strategy].get("init_params", {}).get("start_method")
    if start_method in (None, "popen"):
        return []
    return [f"trainer.strategy={strategy}: its ranks run in {start_method}ed processes, which hand back no step "
            "count, decisions or results to this one; use trainer.strategy=ddp (or trainer=ddp), one process per "
            "device, started as a new command"]


def validate_config(cfg: DictConfig) -> None:
    """Check the composed config before any data or model is built: every value resolves, the keys and value
    types fit the classes they configure, the values are in range, and the run trains at least one step.

    Raises:
        UsageError: listing every problem found, each with its key and value.
    """
    from hydra.utils import get_object

    problems: list[str] = []
    for group in ("trainer", "model", "data", "scheduler"):
        section = _resolved(cfg, group, problems)
        if group == "model" and section.get("num_classes") is None:
            section.pop("num_classes", None)  # taken from the data
        try:
            target = get_object(section["_target_"])
        except Exception as err:  # noqa: BLE001  (an unknown _target_: its own message)
            problems.append(f"{group}._target_={section.get('_target_')!r} cannot be imported: {err}")
            continue
        found = check_arguments(section, target, group)
        problems += found
        if found:
            continue
        arguments = {key: value for key, value in section.items() if not key.startswith("_")}
        try:  # the ranges: constructors that only check their arguments (data, scheduler), or the model's check
            if group in ("data", "scheduler"):
                target(**arguments)
            elif hasattr(target, "check_arguments"):
                target.check_arguments(**arguments)
        except (ValueError, TypeError) as err:
            problems.append(f"{group}: {err}")
        if group == "trainer":
            problems += _run_length_problems(section) + _strategy_problems(section)
    for key, check in _TRAIN_KEYS.items():
        try:
            check(key, OmegaConf.select(cfg, key, default=None))
        except ValueError as err:
            problems.append(str(err))
    layer = CLASSIFIERS.get(OmegaConf.select(cfg, "model.classifier", default=None))
    if layer is not None:  # the settings the classification layer refuses, before the ranks start
        try:
            layer.check_trainer(OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None), world_size=None)
        except ValueError as err:
            problems.append(str(err))
    ckpt_path = OmegaConf.select(cfg, "ckpt_path", default=None)
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        problems.append(f"ckpt_path={ckpt_path!r}: expected a path, a run folder, 'last' or null")
    if problems:
        raise UsageError("invalid configuration (fix these values on the command line or in the config):\n  "
                         + "\n  ".join(problems))
