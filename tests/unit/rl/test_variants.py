"""Each plug-in family's names are written in three places: the config's `name` Literals (rl/config/), the
`@REGISTRY.register(name)` calls, and the registry's built-in modules (rl/registries.py). These tests tie them:
every config variant has exactly one registered implementation and vice versa (plus `custom` exactly where the
registry loads user code), every implementation lives in a module its registry names, and every variant union
of the job schema is checked here, so a variant added on one side only fails."""

from __future__ import annotations

import importlib
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from rl import registries
from rl.config import algorithm, curriculum, data, job, rewards, rollout, swarm
from rl.config.adapters import AdapterConfig
from rl.config.base import CustomSection
from rl.registry import CUSTOM, Registry
from rl.types import Objective

# family -> (the config union whose variants select an implementation, its registry)
UNIONS: dict[str, tuple[object, Registry]] = {
    "loss": (algorithm.LossConfig, registries.LOSSES),
    "advantage": (algorithm.AdvantageConfig, registries.ADVANTAGES),
    "aggregation": (algorithm.AggregationConfig, registries.AGGREGATIONS),
    "algorithm": (algorithm.AnyAlgorithmConfig, registries.ALGORITHMS),
    "adapter": (AdapterConfig, registries.ADAPTERS),
    "env": (data.EnvConfig, registries.ENVS),
    "curriculum": (curriculum.CurriculumConfig, registries.CURRICULA),
    "swarm transport": (swarm.SwarmTransportConfig, registries.SWARM_TRANSPORTS),
    "cluster": (job.ClusterConfig, registries.CLUSTERS),
    "reward model": (rewards.ServiceRewardConfig, registries.REWARD_MODELS),
}
ALL_REGISTRIES = [getattr(registries, n) for n in dir(registries) if isinstance(getattr(registries, n), Registry)]


def variant_models(annotation: object) -> list[type[BaseModel]]:
    """The config classes a (discriminated, optional, listed) union annotation can hold, in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in variant_models(arg)]


def literal_name(model: type[BaseModel]) -> str:
    """The one `name` Literal that selects this variant."""
    names = get_args(model.model_fields["name"].annotation)
    assert len(names) == 1, f"{model.__name__}.name should be one Literal, got {names}"
    return names[0]


def config_names(union: object) -> set[str]:
    names = [literal_name(m) for m in variant_models(union)]
    assert len(names) == len(set(names)), f"two variants share a name: {names}"
    return set(names)


def expected_config_names(registry: Registry) -> set[str]:
    return set(registry.names()) | ({CUSTOM} if registry.accepts_custom else set())


@pytest.mark.parametrize("family", sorted(UNIONS))
def test_config_variants_equal_registered_names(family):
    union, registry = UNIONS[family]
    assert registry.kind == family
    assert config_names(union) == expected_config_names(registry), (
        f"{family}: config variants (rl/config) and registered implementations (+ custom if the registry loads "
        "user code) differ; add the missing side")


@pytest.mark.parametrize("family", sorted(UNIONS))
def test_custom_variant_is_a_custom_section_of_its_own_registry(family):
    union, registry = UNIONS[family]
    custom = [m for m in variant_models(union) if literal_name(m) == CUSTOM]
    for model in custom:
        assert issubclass(model, CustomSection), f"{model.__name__} must subclass CustomSection (import_path, kwargs)"
        assert getattr(registries, model.registry_name) is registry, (
            f"{model.__name__}.registry_name={model.registry_name!r} is not the {family} registry")


def test_rollout_backend_literal_equals_registered_backends():
    backends = set(get_args(rollout.RolloutConfig.model_fields["backend"].annotation))
    assert backends == expected_config_names(registries.ROLLOUT_BACKENDS)


def _unions_in(model: type[BaseModel], seen: set[type]) -> list[frozenset[type]]:
    """Every field of the job schema that selects among `name`d variants, as its set of variant classes."""
    if model in seen:
        return []
    seen.add(model)
    found = []
    for field in model.model_fields.values():
        models = variant_models(field.annotation)
        named = [m for m in models if get_origin(getattr(m.model_fields.get("name"), "annotation", None)) is Literal]
        if named:
            found.append(frozenset(named))
        for m in models:
            found += _unions_in(m, seen)
    return found


def test_every_variant_union_of_the_job_schema_is_tied_to_a_registry():
    tied = {frozenset(variant_models(union)) for union, _ in UNIONS.values()}
    untied = [sorted(m.__name__ for m in u) for u in set(_unions_in(job.JobConfig, set())) if u not in tied]
    assert not untied, f"variant unions without a registry check in this test: {untied}"


def defining_module(entry: object) -> str | None:
    """Where an entry was written: a loss registers an `Objective` around its function."""
    return getattr(entry.fn if isinstance(entry, Objective) else entry, "__module__", None)


@pytest.mark.parametrize("registry", ALL_REGISTRIES, ids=lambda r: r.kind)
def test_builtins_live_in_the_modules_their_registry_names(registry):
    """The third copy: rl/registries.py's module strings. Each must register something, and nothing registered
    may live elsewhere (it would be found only if that module happened to be imported first)."""
    modules = registry.builtin_modules
    for module in modules:
        importlib.import_module(module)
    owners = {name: defining_module(registry.get(name)) for name in registry.names()}
    assert {n: m for n, m in owners.items() if m not in modules} == {}
    assert set(modules) <= set(owners.values()), f"modules registering nothing: {set(modules) - set(owners.values())}"
