"""One registry per component role, and the plugin loader.

Every role has its own :class:`Registry`; its docstring states the contract a registered component must meet.
A component is a class (or factory) registered under a name. If it has a nested ``Config`` dataclass, a
recipe section ``{name: NAME, **fields}`` is validated against that dataclass before anything is built, and
the component is then built as ``component(config, **runtime)``; components without a ``Config`` take no
fields and are called as ``component(**runtime)``.

Third-party packages register components through the entry-point group ``lightning_distill.plugins``: each
entry point names a module (or a callable) that is imported (or called) once, before the first lookup.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

from lightning_distill.errors import UserError

log = logging.getLogger(__name__)

PLUGIN_GROUP = "lightning_distill.plugins"
T = TypeVar("T")


class Registry:
    """Named components of one role.

    Args:
        role: the role's name as it appears in recipes and in ``lightning-distill components ROLE``.
        doc: the contract registered components must follow (signature, return type).
        default: the name a recipe section without ``name`` means (None: ``name`` is required).
    """

    def __init__(self, role: str, doc: str, default: str | None = None) -> None:
        self.role = role
        self.default = default
        """The name a recipe section without ``name`` means (None: ``name`` is required)."""
        self.__doc__ = doc
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name`` (default: its ``__name__``).

        A name already taken raises ``ValueError`` unless ``override=True``.
        """

        def decorator(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries and not override and self._entries[key] is not obj:
                raise ValueError(
                    f"{self.role} {key!r} is already registered (by {_qualname(self._entries[key])}); "
                    "pass override=True to replace it"
                )
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        """The component registered as ``name``; an unknown name is a :class:`UserError` listing the known ones."""
        load_plugins()
        if name not in self._entries:
            raise UserError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        load_plugins()
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.role} {name!r}.{hint} Registered {self.role} components: {', '.join(known) or '(none)'}"

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        load_plugins()
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, Any]]:
        load_plugins()
        return sorted(self._entries.items())


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


TEACHERS = Registry(
    "teacher",
    """Frozen samplers. ``cls(config, *, seed: int, empty: bool = False) -> Teacher`` (``empty``: the same
    architecture on the meta device, no weights read) where a Teacher is an ``nn.Module`` with
    ``forward(x_t, timesteps [B, n+1], cond, guidance) -> x at timesteps[:, -1]`` (no grad, n solver steps),
    ``predict(x, t, cond, guidance) -> (x0, eps)``, a ``schedule`` and a ``denoiser`` module.""",
)
NOISE_SCHEDULES = Registry(
    "noise_schedule",
    """Noise schedules on the integer timestep grid. ``cls(config) -> Schedule`` (see
    :class:`lightning_distill.models.noise.Schedule`): coefficients ``(a, s)`` of ``x_t = a x0 + s ε``, the
    network's time, and the sampler's starting scale. A section without ``name`` is ``discrete``.""",
    default="discrete",
)
STUDENTS = Registry(
    "student",
    """Trainable denoisers. ``cls(config, *, teacher: Teacher, prediction: str | None) -> nn.Module`` with
    ``forward(x_t, t, cond) -> (x0, eps)`` (its parameterisation converts the raw output) and a ``net`` attribute
    (the network an adapter is applied to).""",
)
ADAPTERS = Registry(
    "adapter",
    """What of a student trains. ``cls(config) -> Adapter`` with ``apply(module) -> module`` (inject adapters,
    mark the trainable parameters) and ``merge_state(state_dict) -> state_dict`` (fold the adapter into plain
    weights under the original names).""",
)
BACKBONES = Registry(
    "backbone",
    """Discriminator feature extractors. ``cls(config, *, teacher: Teacher) -> nn.Module`` with
    ``forward(x, t, cond) -> features`` and an ``out_channels: int`` attribute.""",
)
HEADS = Registry(
    "head",
    """Discriminator heads. ``cls(config, *, in_channels: int) -> nn.Module`` with ``forward(features) -> logits``
    of shape ``[B]`` or ``[B, ...]`` (patch logits are averaged by the loss).""",
)
DISCRIMINATORS = Registry(
    "discriminator",
    """Discriminators. ``cls(config, *, teacher: Teacher, conditional: bool) -> nn.Module`` with
    ``forward(x_prev, t_prev, cond, x_t=None, t=None) -> logits``; ``x_t`` is used only when ``conditional``.""",
)
LOSSES = Registry(
    "loss",
    """Objectives. Regression losses: ``cls(config) -> callable(pred, target) -> scalar``. Adversarial losses
    also have ``discriminator_loss(real_logits, fake_logits) -> scalar`` and ``generator_loss(fake_logits) -> scalar``
    and set ``adversarial = True``; ``generator_loss(fake_logits, real_logits)`` gets the real logits (paired per
    sample) when the loss sets ``relativistic = True``.""",
)
REGULARIZERS = Registry(
    "regularizer",
    """Discriminator regularisers, listed under ``method.regularizers``. ``cls(config) -> Regularizer`` whose config
    has ``weight`` and ``every`` (lazy: applied on every ``every``-th discriminator step, scaled by ``every``), with
    ``__call__(d, real, fake, real_logits, fake_logits) -> scalar penalty`` where ``d(x) -> logits`` is the
    discriminator on the batch's conditioning and ``real``/``fake`` the inputs it judged (after re-noising).""",
)
SCHEDULES = Registry(
    "schedule",
    """Stage schedules. ``cls(config) -> Schedule`` with ``phases() -> list[Phase]``: a pure description of every
    phase (stage, kind, length, optimizer settings) that tests can query without a model.""",
)
DATA = Registry(
    "data",
    """Data sources. ``cls(config, *, seed: int) -> torch.utils.data.Dataset`` whose items are dicts of tensors
    (``pixels`` or ``latents``, and conditioning such as ``text``); the loop batches them with a StatefulDataLoader.""",
)
CODECS = Registry(
    "codec",
    """Pixels <-> latents. ``cls(config) -> nn.Module`` with ``encode(pixels) -> latents`` and
    ``decode(latents) -> pixels`` (pixels in [-1, 1]).""",
)
OPTIMIZERS = Registry(
    "optimizer",
    """Optimizer factories. ``fn(config, params, *, lr: float, betas: tuple[float, float], weight_decay: float)
    -> torch.optim.Optimizer``; the schedule supplies lr, betas and weight decay per phase.""",
)
CALLBACKS = Registry(
    "callback",
    """Loop callbacks. ``cls(config, *, out_dir: Path) -> Callback``; hooks are methods named ``on_...`` fired by
    ``fabric.call``; a callback with ``state_dict``/``load_state_dict`` is saved in checkpoints.""",
)
METHODS = Registry(
    "method",
    """Training methods: they own the step. ``cls(config, *, phases, codec, seed) -> Method`` with
    ``build_phase(phase, artifacts) -> modules``, ``prepare(batch, step)``, ``training_step(batch, optimizer_name)
    -> (loss, logs)`` and ``artifact() -> state dicts`` (see :class:`lightning_distill.method.Method`); an optional
    static ``check(config, phases)`` cross-checks a recipe when it loads.""",
)
FEATURES = Registry(
    "features",
    """Feature networks for evaluation. ``cls(config) -> nn.Module`` with ``describe(images) -> Described`` (see
    :mod:`lightning_distill.eval.metrics`): whole-image features, patch features and attribute logits.""",
)
METRICS = Registry(
    "metric",
    """Evaluation metrics. ``cls(config) -> callable(samples, real, teacher) -> float`` over
    :class:`~lightning_distill.eval.metrics.Described` sets (``teacher`` may be None).""",
)

REGISTRIES: dict[str, Registry] = {
    r.role: r
    for r in (
        TEACHERS,
        NOISE_SCHEDULES,
        STUDENTS,
        ADAPTERS,
        BACKBONES,
        HEADS,
        DISCRIMINATORS,
        LOSSES,
        REGULARIZERS,
        SCHEDULES,
        DATA,
        CODECS,
        OPTIMIZERS,
        CALLBACKS,
        METHODS,
        FEATURES,
        METRICS,
    )
}

BUILTIN_MODULES = tuple(
    f"lightning_distill.{m}"
    for m in (
        "callbacks",
        "codecs.base", "codecs.flux", "codecs.minilm", "codecs.sd15", "codecs.sd3", "codecs.sdxl",
        "data.cache", "data.images", "data.synthetic",
        "eval.metrics",
        "methods.diffusion.method", "methods.diffusion.schedule", "methods.lightning.ladder", "methods.lightning.method",
        "models.adapters", "models.discriminator", "models.losses", "models.regularizers", "models.noise", "models.optim", "models.student",
        "models.flux.network", "models.sd3.network", "models.sdxl.network", "models.toy.network", "models.transformer",
        "worlds.shapes.features", "worlds.shapes.world",
    )
)
"""The modules whose import registers the built-in components."""

_plugins_loaded = False
loaded_plugins: list[str] = []


def load_plugins(force: bool = False) -> None:
    """Import the built-in components and every ``lightning_distill.plugins`` entry point, once."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin must not hide which one it was
            raise UserError(f"plugin {ep.name!r} ({ep.value}) failed to load: {err}") from err
        if callable(obj) and not isinstance(obj, type):
            obj()
        loaded_plugins.append(f"{ep.name} ({ep.value})")
        log.info("loaded lightning-distill plugin %s from %s", ep.name, ep.value)


def resolve_import(name: str, base: Path | None) -> str:
    """Where an ``imports:`` entry comes from, as a run records it: a module on ``sys.path`` stays a module name;
    a ``.py`` file, or a module found only beside the recipe (``base``), becomes the file's absolute path, so that
    ``export`` and ``sample`` of the run import it again from anywhere."""
    if name.endswith(".py"):
        path = Path(name).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        return str(path.resolve())
    try:
        if importlib.util.find_spec(name) is not None:
            return name
    except (ImportError, ValueError):
        pass
    if base is not None:
        beside = base.joinpath(*name.split("."))
        for candidate in (beside.with_suffix(".py"), beside / "__init__.py"):
            if candidate.is_file():
                return str(candidate.resolve())
    return name  # not found: import_modules says so


def import_modules(modules: list[str]) -> None:
    """Import the modules a recipe lists under ``imports:`` (unpackaged code that registers components): module
    names, or ``.py`` files (a package's ``__init__.py`` imports the package)."""
    load_plugins()
    for name in modules:
        try:
            if name.endswith(".py"):
                _import_file(Path(name))
            else:
                importlib.import_module(name)
        except (ImportError, FileNotFoundError) as err:
            raise UserError(
                f"imports: cannot import {name!r}: {err}. Give a module on PYTHONPATH, an installed package, or a "
                "module or .py file beside the recipe"
            ) from err


def _import_file(path: Path) -> None:
    """Import a module (or, from its ``__init__.py``, a package) by file, once, under its own name."""
    package = path.name == "__init__.py"
    name = path.parent.name if package else path.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[str(path.parent)] if package else None)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
