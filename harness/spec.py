"""Load and validate ``specs/*.toml``; every error names the file, the key and the problem.

The schema is documented in harness/README.md.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

# the specs a run reads: specs/, or $HANDSON_SPECS_DIR (a folder of your own specs, or tests' own)
SPECS_DIR = Path(os.environ.get("HANDSON_SPECS_DIR") or Path(__file__).resolve().parent.parent / "specs")

CHECK_KINDS = ("exact", "allclose", "property")
STATUSES = ("implemented", "planned")
DEVICES = ("cpu", "cuda")
ASV_MODES = ("track", "none")  # the suite decides the direction from the bound (benchmarks/asv_suite)


def display_path(path: Path) -> str:
    """``specs/08_kv_cache.toml`` when under the working directory, else the full path."""
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


class SpecError(ValueError):
    """A spec is malformed; the message is one line naming file, key and problem."""


@dataclass
class Check:
    name: str
    kind: str
    compare: list[str]
    cases: str
    mutants: list[str]
    subject: str
    property: str | None = None
    oracle: str | None = None
    baseline: str | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    k: float = 2.0
    floor: float = 1e-3
    baseline_rtol: float = 0.1  # low precision: the baseline's own error must be <= this x max|truth| + floor
    examples: int = 20


DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class Claim:
    name: str
    seed: str
    metric: str
    bound: dict[str, float]
    devices: list[str]
    workload: str | None = None
    unit: str = ""
    na_reason: str = ""
    asv: str = "track"
    note: str = ""
    guard: dict[str, float] | None = None  # the regression floor CI enforces (bound decides the verdict)
    guard_note: str = ""  # how the guard was chosen
    unguarded: str = ""  # why the claim cannot be guarded on this machine
    quick: bool = True  # False: only meaningful at full size; "not run" in quick mode
    timeout_s: float = DEFAULT_TIMEOUT_S
    review_note: str = ""  # explains a figure far beyond the seed's (else the verdict is "review")

    @property
    def gated(self) -> bool:
        """CI fails when the guard is crossed."""
        return self.guard is not None


@dataclass
class Spec:
    path: Path
    project: int
    slug: str
    title: str
    phase: str
    status: str
    seed_outcome: str
    builds: list[str]
    papers: list[str] = field(default_factory=list)
    readme: str | None = None
    implementations: dict[str, str] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)

    @property
    def implemented(self) -> bool:
        return self.status == "implemented"

    def callable_path(self, name: str) -> str:
        """``module:callable`` of an implementation or reference by its name in the spec."""
        return {**self.implementations, **self.references}[name]


def resolve(target: str) -> Any:
    """Import ``module:attr`` (attr may be dotted) and return the object."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{target!r} is not of the form 'module:callable'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class _Reader:
    """Typed access to one TOML table with errors that name file and key path."""

    def __init__(self, path: Path, data: dict[str, Any], where: str = ""):
        self.path, self.data, self.where = path, data, where

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(f"spec {display_path(self.path)}: {self.where}{key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple = ()) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "missing required key")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML ints are valid floats; bools are not numbers
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(key, f"must be {names}, got {type(value).__name__} {value!r}")
        if choices and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> list[str]:
        value = self.get(key, list, default)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{key}[{i}]", f"must be str, got {type(item).__name__} {item!r}")
        return value

    def target(self, key: str, value: str, check_import: bool) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
            raise self.fail(key, f"must be 'module:callable', got {value!r}")
        if check_import:
            try:
                obj = resolve(value)
            except (ImportError, AttributeError) as e:
                raise self.fail(key, f"cannot resolve {value!r} ({e.__class__.__name__}: {e})") from None
            if key.split(".")[-1] != "cases" and not callable(obj):
                raise self.fail(key, f"{value!r} is not callable")
        return value

    def sub(self, data: Any, where: str) -> _Reader:
        if not isinstance(data, dict):
            raise self.fail(where.rstrip(". "), f"must be a table, got {type(data).__name__}")
        return _Reader(self.path, data, self.where + where)


def _check(r: _Reader, names: set[str], check_import: bool) -> Check:
    kind = r.get("kind", str, choices=CHECK_KINDS)
    compare = r.strings("compare")
    if not compare:
        raise r.fail("compare", "must name at least one implementation")
    for i, name in enumerate(compare):
        if name not in names:
            raise r.fail(f"compare[{i}]", f"{name!r} is not in [implementations] or [references]")
    subject = r.get("subject", str, "fast" if "fast" in compare else compare[-1])
    if subject not in compare:
        raise r.fail("subject", f"{subject!r} must be one of compare {compare}")
    mutants = r.strings("mutants")
    if not mutants:
        raise r.fail("mutants", "every check needs at least one mutant that it rejects")
    check = Check(
        name=r.get("name", str),
        kind=kind,
        compare=compare,
        cases=r.target("cases", r.get("cases", str), check_import),
        mutants=[r.target(f"mutants[{i}]", m, check_import) for i, m in enumerate(mutants)],
        subject=subject,
        rtol=r.get("rtol", float, 1e-5),
        atol=r.get("atol", float, 1e-5),
        k=r.get("k", float, 2.0),
        floor=r.get("floor", float, 1e-3),
        baseline_rtol=r.get("baseline_rtol", float, 0.1),
        examples=r.get("examples", int, 20),
    )
    if kind == "property":
        check.property = r.target("property", r.get("property", str), check_import)
    if kind == "allclose":
        check.oracle = r.get("oracle", str, compare[0])
        check.baseline = r.get("baseline", str, compare[0])
        for key in ("oracle", "baseline"):
            if getattr(check, key) not in compare:
                raise r.fail(key, f"{getattr(check, key)!r} must be one of compare {compare}")
    elif kind == "exact" and len(compare) < 2:
        raise r.fail("compare", "an exact check compares at least two implementations")
    return check


def _limits(r: _Reader, key: str, required: bool) -> dict[str, float] | None:
    """A ``{ min = N }`` / ``{ max = N }`` table (a bound or a guard)."""
    table = r.get(key, dict, ... if required else None)
    if table is None:
        return None
    t = r.sub(table, f"{key}.")
    parsed = {side: t.get(side, float) for side in ("min", "max") if side in table}
    if set(table) - {"min", "max"} or not parsed:
        raise r.fail(key, f"must be {{ min = N }} and/or {{ max = N }}, got {table!r}")
    if "min" in parsed and "max" in parsed and parsed["min"] > parsed["max"]:
        raise r.fail(key, f"min {parsed['min']} is above max {parsed['max']}")
    return parsed


def _claim(r: _Reader, planned: bool, check_import: bool) -> Claim:
    if "gate" in r.data:
        raise r.fail("gate", "was replaced by `guard = { min = N }` (the regression floor CI enforces) "
                             "or `unguarded = \"why\"`; see harness/README.md")
    parsed = _limits(r, "bound", required=True)
    guard = _limits(r, "guard", required=False)
    if guard is not None and r.data.get("unguarded"):
        raise r.fail("unguarded", "a claim with a guard cannot also say why it is unguarded")
    devices = r.strings("devices")
    for i, device in enumerate(devices):
        if device not in DEVICES:
            raise r.fail(f"devices[{i}]", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    workload = r.get("workload", str, None)
    if workload is None and not planned:
        raise r.fail("workload", "missing required key (only planned specs may omit it)")
    metric = r.get("metric", str)
    timeout_s = r.get("timeout_s", float, DEFAULT_TIMEOUT_S)
    if timeout_s <= 0:
        raise r.fail("timeout_s", f"must be > 0, got {timeout_s}")
    return Claim(
        name=r.get("name", str),
        seed=r.get("seed", str),
        metric=metric,
        bound=parsed,
        devices=devices,
        workload=r.target("workload", workload, check_import) if workload else None,
        unit=r.get("unit", str, ""),
        na_reason=r.get("na_reason", str, ""),
        asv=r.get("asv", str, "track", choices=ASV_MODES),
        note=r.get("note", str, ""),
        guard=guard,
        guard_note=r.get("guard_note", str, ""),
        unguarded=r.get("unguarded", str, ""),
        quick=r.get("quick", bool, True),
        timeout_s=timeout_s,
        review_note=r.get("review_note", str, ""),
    )


def load_spec(path: str | Path, check_import: bool = True) -> Spec:
    """Parse and validate one spec. ``check_import`` also imports every named callable."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"spec {display_path(path)}: not valid TOML: {e}") from None
    r = _Reader(path, data)
    project = r.get("project", int)
    number = re.match(r"(\d+)_", path.name)
    if number and int(number.group(1)) != project:
        raise r.fail("project", f"is {project} but the file name says {int(number.group(1))}")
    status = r.get("status", str, choices=STATUSES)
    planned = status == "planned"
    importing = check_import and not planned
    impls = r.get("implementations", dict, {})
    refs = r.get("references", dict, {})
    spec = Spec(
        path=path,
        project=project,
        slug=r.get("slug", str),
        title=r.get("title", str),
        phase=r.get("phase", str),
        status=status,
        seed_outcome=r.get("seed_outcome", str),
        builds=r.strings("builds"),
        papers=r.strings("papers", []),
        readme=r.get("readme", str, None),
        implementations={k: r.target(f"implementations.{k}", r.sub(impls, "implementations.").get(k, str),
                                     importing) for k in impls},
        references={k: r.target(f"references.{k}", r.sub(refs, "references.").get(k, str), importing)
                    for k in refs},
    )
    names = set(spec.implementations) | set(spec.references)
    checks = r.get("check", list, [])
    claims = r.get("claim", list, [])
    if not planned and not checks:
        raise r.fail("check", "an implemented spec needs at least one [[check]]")
    if not claims:
        raise r.fail("claim", "every spec needs at least one [[claim]]")
    spec.checks = [_check(r.sub(c, f"check[{i}]."), names, importing) for i, c in enumerate(checks)]
    spec.claims = [_claim(r.sub(c, f"claim[{i}]."), planned, importing) for i, c in enumerate(claims)]
    for kind, items in (("check", spec.checks), ("claim", spec.claims)):
        seen = set()
        for i, item in enumerate(items):
            if item.name in seen:
                raise r.fail(f"{kind}[{i}].name", f"duplicate name {item.name!r}")
            seen.add(item.name)
    return spec


def load_specs(directory: str | Path | None = None, check_import: bool = True) -> list[Spec]:
    """Every ``NN_*.toml`` in ``directory`` (default ``specs/``), ordered by project number;
    slugs must be unique."""
    paths = sorted(Path(directory if directory is not None else SPECS_DIR).glob("*.toml"))
    specs = [load_spec(p, check_import) for p in paths]
    specs.sort(key=lambda s: s.project)
    slugs: dict[str, Path] = {}
    for s in specs:
        if s.slug in slugs:
            raise SpecError(f"spec {display_path(s.path)}: slug: {s.slug!r} is also used by {slugs[s.slug]}")
        slugs[s.slug] = s.path
    return specs


def select(specs: list[Spec], pattern: str | None) -> list[Spec]:
    """Specs whose slug, title or number matches ``-k pattern`` (all when None)."""
    if not pattern:
        return specs
    p = pattern.lower()
    return [s for s in specs if p in s.slug or p in s.title.lower() or p == str(s.project)]
