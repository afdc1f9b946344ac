"""Fleet specs: which task fleets run, on which device profiles, for how many rounds.

A :class:`FleetSpec` is a frozen, validated dataclass loaded from ``simulations/fleets/*.toml``
with :func:`load_fleet`. Command-line flags and Flower's kebab-case run-config override it
through one function each (:func:`apply_overrides`, :func:`spec_from_run_config`), at the
boundary; everything past that boundary sees only the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mist_fed.assets.defaults import OFFLINE_BACKBONE
from mist_fed.cloud.backbone import BackboneSpec
from mist_fed.errors import BackboneError, ConfigError, one_of
from mist_fed.fleet import aggregation, availability, partition
from mist_fed.wire.dtypes import check_wire

PROTOCOLS = ("vtab-1k", "full")  # the task split the devices' shares come from
CENTRAL_RECIPES = ("devices", "comparison")  # whose batch size and lr the central reference uses
FLEET_METHODS = ("mist", "mist_pool", "linear", "partial1", "side")


@dataclass(frozen=True)
class TaskFleet:
    """Devices sharing one task (and one method): they federate or stay local.

    ``aggregation``: a registered aggregation's name (any case; Flower's strategies, the
    asynchronous FedBuff and FedAsync, see :mod:`mist_fed.fleet.aggregation`) or ``local``;
    ``aggregation_args``: its keyword arguments,
    checked here by name and kind (the aggregator itself is built once per run, by the plan).
    """

    task: str
    devices: int
    method: str = "mist"
    aggregation: str = "FedAvg"
    name: str = ""
    aggregation_args: dict[str, Any] = field(default_factory=dict, compare=False)
    # this fleet's rounds (server steps for an asynchronous one); None: the spec's ``rounds``
    rounds: int | None = None

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"fleet {self.task!r}: devices must be >= 1, got {self.devices}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"fleet {self.task!r}: rounds must be >= 1, got {self.rounds}")
        one_of(f"fleet {self.task!r}: method", self.method, FLEET_METHODS)
        try:
            object.__setattr__(self, "aggregation", aggregation.canonical(self.aggregation))
            aggregation.check_args(self.aggregation, self.aggregation_args)
        except ConfigError as e:
            raise ConfigError(f"fleet {self.task!r}: {e}") from e
        if not self.name:
            object.__setattr__(self, "name", f"{self.task}/{self.method}")


_DEFAULT_BACKBONE_SPEC = BackboneSpec(OFFLINE_BACKBONE)


@dataclass(frozen=True)
class FleetSpec:
    """Everything a fleet simulation needs; ``config.toml`` of a run is this, written out."""

    fleets: tuple[TaskFleet, ...]
    profiles: tuple[tuple[str, int], ...] = (("rpi4", 1),)
    backbone: BackboneSpec = _DEFAULT_BACKBONE_SPEC  # shared by every fleet of a run
    protocol: str = "vtab-1k"  # the task's training split: VTAB-1k's 800, or the full one
    partitioner: str = "Iid"  # a Flower Datasets partitioner (fleet/partition.py)
    partitioner_args: dict[str, Any] = field(default_factory=dict, compare=False)
    # None: every image of the split is partitioned; else the first devices x train_per_device
    # of a seeded order (more than the split only with share_images: devices share images)
    train_per_device: int | None = None
    share_images: bool = False
    per_round: int | None = None  # devices each fleet samples a round; None: all available
    availability: str = "always"  # always | dropout:P | diurnal[:H] | trace:PATH
    test_per_device: int = 10
    eval_images: int = 1000  # the task's test images the global and central models are scored on
    rounds: int = 3
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    lr_decay: float = 1.0  # the devices' learning rate in round r is lr * lr_decay ** (r - 1)
    k: int | None = None  # gather depth for mist; None = N (all blocks)
    wire_dtype: str = "float16"
    deadline_s: float | None = None  # round deadline in device seconds (stragglers miss it)
    seed: int = 0
    fallback_task: str | None = None  # used with fallback_backbone when real assets are missing
    fallback_backbone: BackboneSpec | None = None
    central: bool = True  # train the central reference (off: population benchmarks)
    # The central reference's batch size and lr: the devices' (``batch_size``, ``lr``) or the
    # comparison's recipe (the trainer's defaults for the method, as simulations/compare.py).
    central_recipe: str = "devices"

    def __post_init__(self) -> None:
        if not self.fleets:
            raise ConfigError("a fleet spec needs at least one [[fleets]] entry")
        names = [f.name for f in self.fleets]
        if len(set(names)) != len(names):
            raise ConfigError(f"fleet names must be unique; got {names} (set `name` per fleet)")
        if not self.profiles or any(n <= 0 for _, n in self.profiles):
            raise ConfigError(f"profile mix needs positive counts, got {self.profiles}")
        one_of("protocol", self.protocol, PROTOCOLS)
        for f in self.fleets:
            object.__setattr__(
                self, "partitioner", partition.check(self.partitioner, self.partitioner_args,
                                                     f.devices)
            )  # fmt: skip
        online = availability.parse(self.availability)
        for key in ("train_per_device", "per_round"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1 (or left out), got {getattr(self, key)}")
        if self.per_round is not None:
            for f in self.fleets:
                if "fraction_train" in f.aggregation_args:
                    raise ConfigError(
                        f"fleet {f.name!r}: give per_round or aggregation_args fraction_train, "
                        "not both"
                    )
        for key in (
            "test_per_device",
            "eval_images",
            "rounds",
            "local_epochs",
            "batch_size",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        check_wire(self.wire_dtype, ConfigError, "wire_dtype")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError("deadline_s must be > 0 (or left out for no deadline)")
        if self.lr <= 0:
            raise ConfigError("lr must be > 0")
        asynchronous = [f.name for f in self.fleets if aggregation.is_async(f.aggregation)]
        if asynchronous and online.drop_p > 0:
            raise ConfigError(
                f"a dropout applies to rounds; asynchronous fleet(s) {', '.join(asynchronous)} "
                "have none: use availability always, diurnal or trace"
            )
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay is a factor in (0, 1], got {self.lr_decay}")
        one_of("central_recipe", self.central_recipe, CENTRAL_RECIPES)

    @property
    def num_devices(self) -> int:
        """The population: every device of every fleet."""
        return sum(f.devices for f in self.fleets)

    def per_round_of(self, fleet: TaskFleet) -> int:
        """The most devices ``fleet`` samples in a round."""
        return fleet.devices if self.per_round is None else min(self.per_round, fleet.devices)

    @property
    def round_slots(self) -> int:
        """The most devices a round sends jobs to, over all fleets."""
        return sum(self.per_round_of(f) for f in self.fleets)

    def data_task(self, task: str) -> str:
        """The task spec devices and the cloud use for ``task`` under the fleet's protocol
        (``fashion-mnist@full``; :func:`mist_fed.data.get_task` reads the suffix)."""
        return task if self.protocol == "vtab-1k" else f"{task}@{self.protocol}"

    def rounds_of(self, fleet: str) -> int:
        """Fleet ``fleet``'s rounds (server steps when asynchronous): its own, or the spec's."""
        own = next(f.rounds for f in self.fleets if f.name == fleet)
        return self.rounds if own is None else own


# -- parsing -------------------------------------------------------------------------------


def parse_profile_mix(text: str) -> tuple[tuple[str, int], ...]:
    """``"rpi4"`` or ``"rpi4:30,phone-low:20"`` -> ``(("rpi4", 30), ("phone-low", 20))``."""
    mix: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition(":")
        if not name or (sep and not count.strip().isdigit()):
            raise ConfigError(
                f"bad profile mix entry {part!r}; write `rpi4` or `rpi4:30,phone-low:20`"
            )
        mix.append((name.strip(), int(count) if sep else 1))
    if not mix:
        raise ConfigError("empty profile mix; write `rpi4` or `rpi4:30,phone-low:20`")
    return tuple(mix)


def format_profile_mix(mix: tuple[tuple[str, int], ...]) -> str:
    return ",".join(f"{n}:{c}" for n, c in mix)


def assign_profiles(mix: tuple[tuple[str, int], ...], devices: int) -> list[str]:
    """One profile name per device. Counts summing to ``devices`` are exact; otherwise they are
    proportions, rounded by largest remainder. Order interleaves the kinds evenly."""
    total = sum(c for _, c in mix)
    if total == devices:
        counts = [c for _, c in mix]
    else:
        raw = [c * devices / total for _, c in mix]
        counts = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: devices - sum(counts)]:
            counts[i] += 1
    # Interleave: device j takes the kind whose quota is furthest behind.
    out: list[str] = []
    given = [0] * len(mix)
    for j in range(devices):
        i = max(range(len(mix)), key=lambda i: counts[i] * (j + 1) / devices - given[i])
        given[i] += 1
        out.append(mix[i][0])
    return out


def _backbone(d: Mapping[str, Any], where: str) -> BackboneSpec:
    """A ``[backbone]`` table -> :class:`BackboneSpec`; ``name`` defaults to the offline DINOv2."""
    allowed = {f.name for f in dataclasses.fields(BackboneSpec)}
    _reject_unknown(d, allowed, where)
    try:
        return BackboneSpec(**{"name": OFFLINE_BACKBONE, **d})
    except BackboneError as e:
        raise ConfigError(f"{where}: {e}") from e


def _reject_unknown(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(sorted(unknown))} in {where}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def spec_from_dict(d: Mapping[str, Any]) -> FleetSpec:
    """Build a spec from parsed TOML (snake_case keys, as in ``simulations/fleets/*.toml``)."""
    d = dict(d)
    d.pop("run", None)  # a results config.toml records how it ran under [run]
    allowed = {f.name for f in dataclasses.fields(FleetSpec)}
    _reject_unknown(d, allowed, "fleet spec")
    fleets_raw = d.pop("fleets", None)
    if not isinstance(fleets_raw, list) or not fleets_raw:
        raise ConfigError("a fleet spec needs at least one [[fleets]] table")
    fleet_fields = {f.name for f in dataclasses.fields(TaskFleet)}
    fleets = []
    for i, f in enumerate(fleets_raw):
        _reject_unknown(f, fleet_fields, f"[[fleets]] #{i + 1}")
        fleets.append(TaskFleet(**f))
    kw: dict[str, Any] = {"fleets": tuple(fleets)}
    if "profiles" in d:
        p = d.pop("profiles")
        kw["profiles"] = (
            parse_profile_mix(p)
            if isinstance(p, str)
            else tuple((str(n), int(c)) for n, c in (p.items() if isinstance(p, dict) else p))
        )
    if "backbone" in d:
        kw["backbone"] = _backbone(d.pop("backbone"), "[backbone]")
    if d.get("fallback_backbone") is not None:
        kw["fallback_backbone"] = _backbone(d.pop("fallback_backbone"), "[fallback_backbone]")
    kw.update(d)
    try:
        return FleetSpec(**kw)
    except TypeError as e:
        raise ConfigError(f"bad fleet spec: {e}") from e


def load_fleet(path: str | Path) -> FleetSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"fleet spec {p} not found; see simulations/fleets/ for examples")
    with p.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
    return spec_from_dict(data)


def spec_to_dict(spec: FleetSpec) -> dict[str, Any]:
    """The TOML-ready form (``None`` fields left out), round-tripping through spec_from_dict."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    d = dataclasses.asdict(spec)
    d["profiles"] = format_profile_mix(spec.profiles)
    return clean(d)


# -- overrides: command-line flags and Flower run-config -------------------------------------

OVERRIDES = (
    "devices",
    "profile",
    "tasks",
    "method",
    "aggregation",
    "aggregation_args",
    "protocol",
    "partitioner",
    "partitioner_args",
    "per_round",
    "availability",
    "rounds",
    "local_epochs",
    "lr",
    "lr_decay",
    "k",
    "wire_dtype",
    "deadline_s",
    "seed",
    "train_per_device",
    "test_per_device",
    "eval_images",
    "batch_size",
)


def spread(total: int, parts: int) -> list[int]:
    """``total`` devices over ``parts`` fleets, as evenly as possible."""
    if total < parts:
        raise ConfigError(f"{total} devices cannot cover {parts} fleets; give --devices >= {parts}")
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def apply_overrides(spec: FleetSpec, **kw: Any) -> FleetSpec:
    """Override a spec from flags. ``devices`` is the total, spread over the fleets;
    ``tasks`` (comma-separated) replaces the fleets' tasks; ``profile`` is a mix string."""
    kw = {k: v for k, v in kw.items() if v is not None}
    unknown = set(kw) - set(OVERRIDES)
    if unknown:
        raise ConfigError(f"unknown override(s): {', '.join(sorted(unknown))}")
    fleets = list(spec.fleets)
    if "tasks" in kw:
        tasks = [t.strip() for t in str(kw.pop("tasks")).split(",") if t.strip()]
        base = fleets[0]
        fleets = [dataclasses.replace(base, task=t, name="") for t in tasks]
    if "aggregation_args" in kw and isinstance(kw["aggregation_args"], str):
        kw["aggregation_args"] = _json_args(kw["aggregation_args"], "aggregation")
    if "partitioner_args" in kw and isinstance(kw["partitioner_args"], str):
        kw["partitioner_args"] = _json_args(kw["partitioner_args"], "partitioner")
    if "partitioner" in kw and "partitioner_args" not in kw:
        kw["partitioner_args"] = {}  # another partitioner's arguments do not carry over
    fleet_kw = {k: kw.pop(k) for k in ("method", "aggregation", "aggregation_args") if k in kw}
    if "aggregation" in fleet_kw and "aggregation_args" not in fleet_kw:
        fleet_kw["aggregation_args"] = {}  # another strategy's arguments do not carry over
    if fleet_kw:
        fleets = [dataclasses.replace(f, name="", **fleet_kw) for f in fleets]
    if "rounds" in kw:  # --rounds: every fleet's
        fleets = [dataclasses.replace(f, rounds=None) for f in fleets]
    if "devices" in kw:
        counts = spread(int(kw.pop("devices")), len(fleets))
        fleets = [dataclasses.replace(f, devices=n) for f, n in zip(fleets, counts, strict=True)]
    if "profile" in kw:
        kw["profiles"] = parse_profile_mix(str(kw.pop("profile")))
    if kw.get("k") is not None and int(kw["k"]) < 0:
        kw["k"] = None
    for key in ("train_per_device", "per_round"):  # 0: unset (the whole split; every device)
        if kw.get(key) is not None and int(kw[key]) <= 0:
            kw[key] = None
    return dataclasses.replace(spec, fleets=tuple(fleets), **kw)


def _json_args(text: str, what: str) -> dict[str, Any]:
    """``--aggregation-args '{"eta": 0.01}'`` -> a dict (one clear line when it is not one)."""
    example = '{"eta": 0.01}' if what == "aggregation" else '{"alpha": 0.3}'
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} args must be a JSON object, e.g. '{example}': {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{what} args must be a JSON object, e.g. '{example}', got {text!r}")
    return value


def spec_from_run_config(run_config: Mapping[str, Any], base_dir: Path | None = None) -> FleetSpec:
    """Flower's kebab-case run-config (``[tool.flwr.app.config]``) -> a spec, once, at the edge.

    ``fleet`` names the TOML spec; any of the kebab-case forms of :data:`OVERRIDES` override it.
    """
    rc = {str(k).replace("-", "_"): v for k, v in run_config.items()}
    fleet = Path(str(rc.get("fleet", "simulations/fleets/default.toml")))
    if not fleet.is_absolute() and base_dir is not None:
        fleet = base_dir / fleet
    spec = load_fleet(fleet)
    over = {k: rc[k] for k in OVERRIDES if k in rc and rc[k] != ""}
    if "deadline_s" in over and float(over["deadline_s"]) <= 0:
        over["deadline_s"] = None
    return apply_overrides(spec, **over)
