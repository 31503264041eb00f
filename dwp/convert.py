"""Turn any ``nn.Module`` into its Bayesian version and back."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from .nn import DEFAULT_INIT_LOG_SIGMA, BayesianLayer, InitLogSigma, bayesian_twin
from .priors import Prior
from .select import LayerSelector, LayerSpec, bayesian_layers, model_layers
from .settings import Estimator, Mode

__all__ = [
    "bayesianize",
    "init_from_prior_",
    "name_sites",
    "to_deterministic",
]

PriorSpec = Prior | Callable[[str, nn.Module], Prior] | None
#: Where one layer's weights start: kept, from its prior, or torch's initialisation.
InitChoice = Literal["pretrained", "prior", "fresh"]
#: What ``init=`` accepts: one choice for every layer, a function ``(name, layer) ->
#: choice``, or a mapping from glob patterns on qualified names to choices (the first
#: pattern that matches wins; layers no pattern matches keep ``"pretrained"``).
Init = InitChoice | Callable[[str, nn.Module], InitChoice] | Mapping[str, InitChoice]
_INIT_CHOICES = ("pretrained", "prior", "fresh")


def _check_init(choice: object, what: str) -> InitChoice:
    if not isinstance(choice, str) or choice not in _INIT_CHOICES:
        raise ValueError(f"{what} must be 'pretrained', 'prior' or 'fresh', got {choice!r}")
    return choice


def _init_choice(init: Init) -> Callable[[str, nn.Module], InitChoice]:
    """``init=`` as a function ``(name, layer) -> choice`` whose answers are checked."""
    if isinstance(init, str):
        choice = _check_init(init, "init")
        return lambda name, layer: choice
    if isinstance(init, Mapping):
        rules = []
        for pattern, choice in init.items():
            if not isinstance(pattern, str):
                raise TypeError(f"init's keys must be name patterns, got {pattern!r}")
            rules.append(
                (LayerSelector(pattern, "init"), _check_init(choice, f"init[{pattern!r}]"))
            )

        def by_pattern(name: str, layer: nn.Module) -> InitChoice:
            return next((c for rule, c in rules if rule.matches_name(name)), "pretrained")

        return by_pattern
    if callable(init):
        return lambda name, layer: _check_init(init(name, layer), f"init({name!r}, layer)")
    raise ValueError(
        f"init must be 'pretrained', 'prior' or 'fresh', a function (name, layer) -> one of "
        f"them or a mapping from name patterns to them, got {init!r}"
    )


def _check_init_patterns(init: Init, names: Iterable[str]) -> None:
    """Patterns of an ``init=`` mapping that match none of the chosen layers are errors
    (usually a typo), as they are in ``include=``."""
    if isinstance(init, Mapping):
        unused = LayerSelector(list(init), "init").unused_patterns(names)
        if unused:
            raise ValueError(f"init patterns {unused} match none of the layers chosen")


def _torch_init_weight(layer: nn.Module) -> Tensor:
    """torch's default initialisation of ``layer``'s weight (its torch twin's for a
    Bayesian layer), as a new tensor: the layer's bias and posterior scales stay as they
    are."""
    twin = layer.torch_twin if isinstance(layer, BayesianLayer) else type(layer)
    return twin(**_constructor_kwargs(layer)).weight.detach()


def _check_patterns(included: LayerSelector, convertible: list[str], module: nn.Module) -> None:
    """Name patterns of ``include`` that match no convertible layer are errors (usually a
    typo, or a layer that is Bayesian already, which the message then says)."""
    unused = included.unused_patterns(convertible)
    if not unused:
        return
    already = [n for n, _ in bayesian_layers(module) if LayerSelector(unused).matches_name(n)]
    if already:
        raise ValueError(
            f"include patterns {unused} match layers of {type(module).__name__} that are "
            f"Bayesian already ({already[:5]}); bayesianize converts torch layers only"
        )
    raise ValueError(
        f"include patterns {unused} match no convertible layer of {type(module).__name__}"
    )


def _constructor_kwargs(layer: nn.Module) -> dict:
    """Arguments that rebuild ``layer`` (a torch conv/linear layer or its Bayesian twin)."""
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return dict(
            in_features=layer.in_features,
            out_features=layer.out_features,
            bias=layer.bias is not None,
            **factory,
        )
    kwargs = dict(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        **factory,
    )
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        kwargs["output_padding"] = layer.output_padding
    return kwargs


def name_sites(model: nn.Module) -> nn.Module:
    """Record each Bayesian layer's qualified name (used in errors and by group priors)."""
    for name, module in model_layers(model):
        # only layers not named yet: a call on a submodule (dwp.kl(model.encoder)) must not
        # rename layers that bayesianize or a call on the whole model named
        if isinstance(module, BayesianLayer) and module.site_name == type(module).__name__:
            module.site_name = name or type(module).__name__
    return model


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _convert(
    layer: nn.Module,
    twin: type[BayesianLayer],
    name: str,
    prior: PriorSpec,
    init: InitChoice,
    bias_prior: Prior | None,
    **options,
) -> BayesianLayer:
    """One Bayesian twin of ``layer``, its prior bound to the pretrained weights."""
    new = twin(**_constructor_kwargs(layer), **options)
    new.site_name = name or type(new).__name__
    new.train(layer.training)
    # copy first whatever ``init``: template priors (PretrainedNormalPrior()) bind to the
    # pretrained weights, never to a random initialisation
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    site_prior = prior(name, layer) if callable(prior) and not isinstance(prior, Prior) else prior
    new.set_prior(site_prior, bias_prior)
    if init != "pretrained":
        new.reset_parameters()  # torch's initialisation of the means, init_log_sigma again
    if init == "prior":  # DWP initialisation: each parameter from its own prior, if it gives one
        sites = [(new.weight, new.weight_prior)]
        if new.bayesian_bias:
            sites.append((new.bias, new.bias_prior))
        with torch.no_grad():
            for param, site in sites:
                draw = site.init_sample(param.shape)
                if draw is not None:  # else torch's initialisation, from reset_parameters()
                    param.copy_(draw)
    return new


def _copying(choose: Callable[[str, nn.Module], Prior]) -> Callable[[str, nn.Module], Prior]:
    """``choose`` whose priors are copied once per distinct object, as for a plain prior:
    a function returning one shared prior for many layers gives them one shared copy."""
    copies: dict[int, tuple[Prior, Prior]] = {}  # id -> (original kept alive, copy)

    def site_prior(name: str, layer: nn.Module) -> Prior:
        original = choose(name, layer)
        if not isinstance(original, Prior):
            return original  # rejected with a clear error by the caller
        if id(original) not in copies:
            copies[id(original)] = (original, copy.deepcopy(original))
        return copies[id(original)][1]

    return site_prior


def bayesianize(
    module: nn.Module,
    prior: PriorSpec = None,
    *,
    include: LayerSpec = None,
    exclude: LayerSpec = None,
    init: Init = "pretrained",
    bias_prior: Prior | None = None,
    bayesian_bias: bool = False,
    init_log_sigma: InitLogSigma = DEFAULT_INIT_LOG_SIGMA,
    estimator: Estimator | str = Estimator.REPARAM,
    mode: Mode | str = Mode.AUTO,
    inplace: bool = False,
) -> nn.Module:
    """Replace conv / linear layers of ``module`` by their Bayesian twins.

    Works on any module tree (a MONAI network too); layer types with a twin are
    ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` and ``Linear`` (exact classes only: a
    subclass may override ``forward`` and is left alone).

    Parameters
    ----------
    module
        The network.  Copied first unless ``inplace=True``.
    prior
        A :class:`~dwp.priors.Prior` for every chosen layer, or a function
        ``(name, layer) -> Prior`` choosing one per layer.  Default ``NormalPrior()``.
        A prior object is copied (once per call; likewise each distinct object the function
        returns): training the model, e.g. a deep weight prior's encoder, never changes the
        object passed in.
        A prior that does not fit a layer (e.g. a kernel prior of another kernel shape)
        raises :class:`~dwp.priors.PriorMismatchError` naming the layer.
    include, exclude
        Which layers to convert: qualified-name glob patterns (``"encoder.*"``), layer types
        (``nn.Conv3d``) or a predicate ``(name, layer) -> bool``.  Default: every layer
        with a twin.  A name pattern in ``include`` that matches no convertible layer is an
        error (it is usually a typo).
    init
        Where the posterior means start: the existing weights (``"pretrained"``), the
        layer's own prior (``"prior"``; for a deep weight prior this is "DWP
        initialisation"), or torch's default initialisation (``"fresh"``).  One choice for
        every layer, a function ``(name, layer) -> choice``, or a mapping from glob patterns
        on qualified names to choices (``{"head*": "fresh", "*": "prior"}``; the first match
        wins, layers no pattern matches keep ``"pretrained"``, a pattern matching no
        converted layer is an error).  Under ``"prior"`` each weight (and Bayesian bias)
        starts from :meth:`~dwp.priors.Prior.init_sample` of its own prior: priors fitted from source
        material are sampled, a non-informative :class:`~dwp.priors.NormalPrior` declines
        and its layer gets torch's initialisation, as under ``"fresh"`` (N(0, 1) draws
        would ignore the fan-in: weight std 1 where torch's is 0.07 for 64 features);
        deterministic biases get torch's initialisation.  Priors are bound to the existing
        weights for every choice, so a ``PretrainedNormalPrior()`` template is centred on
        them.
    bias_prior, bayesian_bias, init_log_sigma, estimator, mode
        Passed to every new layer (see :class:`dwp.nn.BayesianLayer`).
    inplace
        Modify ``module`` instead of a deep copy.

    Returns
    -------
    nn.Module
        The Bayesian network; in mean mode it computes what ``module`` did when
        ``init="pretrained"``.
    """
    choose_init = _init_choice(init)
    root = module if inplace else copy.deepcopy(module)
    # The model owns its prior state (a deep weight prior's encoder keeps training with it):
    # copy prior objects once per call, so training never changes the object passed in and
    # one prior can serve many models.  Layers of this model still share the copy.
    if isinstance(prior, Prior):
        prior = copy.deepcopy(prior)
    elif callable(prior):
        prior = _copying(prior)
    if bias_prior is not None:
        bias_prior = copy.deepcopy(bias_prior)
    included = LayerSelector(include, "include")
    excluded = LayerSelector(exclude, "exclude", default=False)
    options = dict(
        bayesian_bias=bayesian_bias, init_log_sigma=init_log_sigma, estimator=estimator, mode=mode
    )

    targets = []
    # remove_duplicate=False: a module registered under several names (tied weights) is
    # replaced at every name by one and the same Bayesian layer
    layers = list(model_layers(root, remove_duplicate=False))
    for name, layer in layers:
        twin = bayesian_twin(type(layer))
        if twin is None or not included(name, layer) or excluded(name, layer):
            continue
        targets.append((name, layer, twin))
    _check_patterns(included, [n for n, m in layers if bayesian_twin(type(m))], module)
    _check_init_patterns(init, [name for name, _, _ in targets])

    converted: dict[int, BayesianLayer] = {}
    for name, layer, twin in targets:
        new = converted.get(id(layer))
        if new is None:
            choice = choose_init(name, layer)
            new = converted[id(layer)] = _convert(
                layer, twin, name, prior, choice, bias_prior, **options
            )
        if not name:  # the root itself is a layer
            return new
        _replace(root, name, new)
    return name_sites(root)


def to_deterministic(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every Bayesian layer by its torch twin holding the posterior mean.

    The result has no ``dwp`` dependency and computes what ``module`` computes in mean mode.
    """
    root = module if inplace else copy.deepcopy(module)

    def plain(layer: BayesianLayer) -> nn.Module:
        twin = layer.torch_twin(**_constructor_kwargs(layer))
        with torch.no_grad():
            twin.weight.copy_(layer.weight)
            if layer.bias is not None:
                twin.bias.copy_(layer.bias)
        return twin.train(layer.training)

    if isinstance(root, BayesianLayer):
        return plain(root)
    targets = [
        (name, layer)
        for name, layer in model_layers(root, remove_duplicate=False)
        if isinstance(layer, BayesianLayer)
    ]
    converted: dict[int, nn.Module] = {}  # tied layers stay tied
    for name, layer in targets:
        if id(layer) not in converted:
            converted[id(layer)] = plain(layer)
        _replace(root, name, converted[id(layer)])
    return root


@torch.no_grad()
def init_from_prior_(
    module: nn.Module,
    prior: PriorSpec = None,
    *,
    init: Init = "prior",
    include: LayerSpec = None,
    exclude: LayerSpec = None,
) -> nn.Module:
    """Overwrite weights with samples from their prior, in place ("DWP initialisation").

    Atanov et al. (2019) found that starting from kernels sampled from the deep weight
    prior speeds up training and helps even without the Bayesian objective.  Works on plain
    torch layers and on Bayesian layers (whose posterior means are overwritten, their
    scales kept); biases are left alone.

    Parameters
    ----------
    module
        The network, modified in place and returned.
    prior
        The prior to sample: a :class:`~dwp.priors.Prior` for every chosen layer, a
        function ``(name, layer) -> Prior``, or ``None``: each Bayesian layer's own weight
        prior (a plain layer then raises, naming it).  It is bound to each layer first, so
        a layer it does not fit raises :class:`~dwp.priors.PriorMismatchError`.  As in
        :func:`bayesianize`, a prior that declines (:meth:`~dwp.priors.Prior.init_sample`, e.g. a
        non-informative :class:`~dwp.priors.NormalPrior`) gives torch's initialisation.
    init
        What each chosen layer gets, as in :func:`bayesianize`: ``"prior"`` (default),
        ``"fresh"`` (torch's initialisation of the weight) or ``"pretrained"`` (left as it
        is); one choice, a function ``(name, layer) -> choice``, or a mapping from name
        patterns to choices.
    include, exclude
        Which conv / linear layers, as in :func:`bayesianize`.
    """
    choose_init = _init_choice(init)
    included = LayerSelector(include, "include")
    excluded = LayerSelector(exclude, "exclude", default=False)
    chosen = []
    for name, layer in model_layers(module):
        is_layer = isinstance(layer, BayesianLayer) or bayesian_twin(type(layer)) is not None
        if is_layer and included(name, layer) and not excluded(name, layer):
            chosen.append((name, layer))
    if included.patterns and not chosen:
        raise ValueError(f"include patterns {list(included.patterns)} match no conv / linear layer")
    _check_init_patterns(init, [name for name, _ in chosen])
    for name, layer in chosen:
        choice = choose_init(name, layer)
        if choice == "pretrained":
            continue
        draw = None
        if choice == "prior":
            draw = _weight_prior(prior, name, layer).init_sample(layer.weight.shape)
        layer.weight.copy_(_torch_init_weight(layer) if draw is None else draw)
    return module


def _weight_prior(prior: PriorSpec, name: str, layer: nn.Module) -> Prior:
    """The prior of ``layer``'s weight for :func:`init_from_prior_`, bound to the layer."""
    if prior is None:
        if not isinstance(layer, BayesianLayer):
            raise ValueError(
                f"init_from_prior_: layer {name!r} ({type(layer).__name__}) is not Bayesian, "
                f"so it has no prior of its own; pass prior="
            )
        return layer.weight_prior
    chosen = prior(name, layer) if callable(prior) and not isinstance(prior, Prior) else prior
    if not isinstance(chosen, Prior):
        raise TypeError(f"init_from_prior_: the prior for {name!r} is not a Prior: {chosen!r}")
    kernel_dims = 0 if isinstance(layer, nn.Linear) else len(layer.kernel_size)
    return chosen.for_site(f"{name}.weight", layer.weight, kernel_dims)
