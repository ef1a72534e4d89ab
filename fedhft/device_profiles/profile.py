"""Device profiles: what one class of device can give a training job (RAM, compute, network, runtimes)."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fedhft.errors import FedHFTError

RUNTIMES = ("ort", "executorch")
ARCHES = ("x86_64", "aarch64")


class ProfileError(FedHFTError):
    """A profile that cannot be found or does not validate."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device class. Numbers are sustained figures a training job can count on."""

    name: str
    description: str
    arch: str  # "x86_64" | "aarch64"
    ram_mb: int  # physical RAM
    train_memory_fraction: float  # share of RAM a training job may use, in (0, 1]
    fp32_gflops: float  # sustained fp32 GFLOP/s of the CPU (or accelerator) a training job gets
    uplink_mbps: float
    downlink_mbps: float
    runtimes: tuple[str, ...]  # subset of RUNTIMES the device can run
    default_runtime: str  # one of runtimes
    target_step_seconds: float  # a local training step should not take longer
    target_upload_seconds: float  # one round's upload should not take longer
    batch_size: int = 8  # local batch size
    sources: tuple[str, ...] = field(default_factory=tuple)  # public specs the numbers come from

    @property
    def memory_budget_mb(self) -> float:
        return self.ram_mb * self.train_memory_fraction

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runtimes"] = list(self.runtimes)
        d["sources"] = list(self.sources)
        return d


ResourceLevel = Literal["low", "mid", "high"]
RESOURCE_LEVELS: tuple[ResourceLevel, ...] = ("low", "mid", "high")

# resource_level thresholds (see its docstring for why these numbers).
LOW_BUDGET_MB = 1200.0
LOW_GFLOPS = 15.0
LOW_UPLINK_MBPS = 10.0
HIGH_BUDGET_MB = 4000.0
HIGH_GFLOPS = 50.0
HIGH_UPLINK_MBPS = 40.0

_PACKAGE = "fedhft.device_profiles"
_PROFILES_DIR = "profiles"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIELD_NAMES = tuple(f.name for f in fields(DeviceProfile))
_OPTIONAL_FIELDS = ("batch_size", "sources")  # they have defaults in DeviceProfile
_POSITIVE_FLOATS = (
    "fp32_gflops",
    "uplink_mbps",
    "downlink_mbps",
    "target_step_seconds",
    "target_upload_seconds",
)


def _show(value: Any) -> str:
    """A short one-line rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def profile_from_dict(data: dict[str, Any], source: str) -> DeviceProfile:
    """Validate the parsed TOML table `data` and build a DeviceProfile from it.

    `source` names where the data came from (a file name) and starts every error message. Every field is
    checked; the first problem raises ProfileError with one line naming the source and the field.
    """

    def fail(key: str, problem: str) -> ProfileError:
        return ProfileError(f"profile {source}: field '{key}' {problem}, got {_show(data[key])}")

    if not isinstance(data, dict):
        raise ProfileError(f"profile {source}: expected a table of fields, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in _FIELD_NAMES)
    if unknown:
        raise ProfileError(
            f"profile {source}: unknown field '{unknown[0]}' (allowed fields: {', '.join(_FIELD_NAMES)})"
        )
    missing = [k for k in _FIELD_NAMES if k not in data and k not in _OPTIONAL_FIELDS]
    if missing:
        raise ProfileError(f"profile {source}: missing required field '{missing[0]}'")

    values: dict[str, Any] = {}

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise fail("name", "must be a non-empty string of letters, digits, '.', '_' or '-'")
    values["name"] = name

    description = data["description"]
    if not isinstance(description, str) or not description.strip():
        raise fail("description", "must be a non-empty string")
    values["description"] = description

    arch = data["arch"]
    if arch not in ARCHES:
        raise fail("arch", f"must be one of {', '.join(ARCHES)}")
    values["arch"] = arch

    ram_mb = data["ram_mb"]
    if not (_is_number(ram_mb) and ram_mb > 0):
        raise fail("ram_mb", "must be a positive number")
    if not isinstance(ram_mb, int):
        raise fail("ram_mb", "must be a whole number of MB")
    values["ram_mb"] = ram_mb

    fraction = data["train_memory_fraction"]
    if not (_is_number(fraction) and 0 < fraction <= 1):
        raise fail("train_memory_fraction", "must be a number in (0, 1]")
    values["train_memory_fraction"] = float(fraction)

    for key in _POSITIVE_FLOATS:
        value = data[key]
        if not (_is_number(value) and value > 0):
            raise fail(key, "must be a positive number")
        values[key] = float(value)

    runtimes = data["runtimes"]
    if not isinstance(runtimes, list) or not runtimes:
        raise fail("runtimes", f"must be a non-empty list drawn from {', '.join(RUNTIMES)}")
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            raise ProfileError(
                f"profile {source}: field 'runtimes' has unknown runtime {_show(runtime)} "
                f"(known: {', '.join(RUNTIMES)})"
            )
    if len(set(runtimes)) != len(runtimes):
        raise fail("runtimes", "must not repeat a runtime")
    values["runtimes"] = tuple(runtimes)

    default_runtime = data["default_runtime"]
    if not isinstance(default_runtime, str) or default_runtime not in runtimes:
        raise fail("default_runtime", f"must be one of the profile's runtimes ({', '.join(runtimes)})")
    values["default_runtime"] = default_runtime

    if "batch_size" in data:
        batch_size = data["batch_size"]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise fail("batch_size", "must be an integer >= 1")
        values["batch_size"] = batch_size

    if "sources" in data:
        sources = data["sources"]
        if not isinstance(sources, list) or not all(isinstance(s, str) and s.strip() for s in sources):
            raise fail("sources", "must be a list of non-empty strings")
        values["sources"] = tuple(sources)

    return DeviceProfile(**values)


def _shipped_dir() -> Any:
    """The package-data folder holding the shipped <name>.toml files (an importlib.resources Traversable)."""
    return resources.files(_PACKAGE).joinpath(_PROFILES_DIR)


def shipped_profile_names() -> list[str]:
    """Names of the profiles shipped with fedhft, sorted."""
    return sorted(
        entry.name[: -len(".toml")]
        for entry in _shipped_dir().iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    )


def _parse(text_bytes: bytes, source: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"profile {source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source}: invalid TOML: {exc}") from exc
    return profile_from_dict(data, source)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name (e.g. "rpi4-4gb") or a user's profile from a TOML file path.

    A Path, a string ending in ".toml", or a string naming an existing file is read as a file; any other
    string is looked up among the shipped profiles. Raises ProfileError (one line) when the profile is
    unknown, unreadable, not valid TOML or does not validate.
    """
    as_path = Path(name_or_path)
    if isinstance(name_or_path, Path) or str(name_or_path).endswith(".toml") or as_path.is_file():
        if not as_path.is_file():
            raise ProfileError(f"profile file '{as_path}' not found")
        try:
            raw = as_path.read_bytes()
        except OSError as exc:
            raise ProfileError(f"profile file '{as_path}' cannot be read: {exc.strerror}") from exc
        return _parse(raw, str(as_path))

    name = str(name_or_path)
    shipped = shipped_profile_names()
    if name not in shipped:
        raise ProfileError(
            f"unknown profile {name!r}; shipped profiles: {', '.join(shipped)} "
            "(or give the path of your own .toml file)"
        )
    source = f"{name}.toml"
    profile = _parse(_shipped_dir().joinpath(source).read_bytes(), source)
    if profile.name != name:
        raise ProfileError(f"profile {source}: field 'name' must match the file name {name!r}, got {profile.name!r}")
    return profile


def list_profiles() -> list[DeviceProfile]:
    """All shipped profiles, sorted by name."""
    return sorted((load_profile(name) for name in shipped_profile_names()), key=lambda p: p.name)


def resource_level(profile: DeviceProfile) -> ResourceLevel:
    """Classify a device as "low", "mid" or "high" from its memory budget, compute and uplink.

    Rule (budget = ram_mb * train_memory_fraction):
      * "low"  if budget < 1200 MB, or fp32_gflops < 15, or uplink_mbps < 10;
      * "high" if budget >= 4000 MB and fp32_gflops >= 50 and uplink_mbps >= 40;
      * "mid"  otherwise.

    Why these numbers: one training step of a MiniLM-L6-class encoder on 8 x 128 tokens costs roughly
    45-70 GFLOP (forward ~23 GFLOP, backward 1-2x that), so below 15 GFLOP/s a step takes 3-5 s or more and
    only a small trainable slice fits the step budget; under ~1.2 GB the weights, activations kept for the
    backward pass and runtime overhead leave little room; under 10 Mbit/s uploads dominate a round. The high
    bar asks for room for larger ranks and more layers on all three axes at once. With these thresholds the
    shipped profiles spread as: rpi4-4gb and phone-lowend-3gb low (compute, resp. memory and uplink);
    rpi5-8gb, jetson-orin-nano-8gb and phone-midrange-6gb mid (CPU compute below 50 GFLOP/s, and for the
    phone its 1.8 GB budget); laptop-x86-16gb high.
    """
    budget = profile.memory_budget_mb
    gflops, uplink = profile.fp32_gflops, profile.uplink_mbps
    if budget < LOW_BUDGET_MB or gflops < LOW_GFLOPS or uplink < LOW_UPLINK_MBPS:
        return "low"
    if budget >= HIGH_BUDGET_MB and gflops >= HIGH_GFLOPS and uplink >= HIGH_UPLINK_MBPS:
        return "high"
    return "mid"
