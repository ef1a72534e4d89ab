"""Device profiles: the shipped ones load and validate, user files work, and bad input fails clearly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedhft.device_profiles import (
    ARCHES,
    RESOURCE_LEVELS,
    RUNTIMES,
    DeviceProfile,
    ProfileError,
    list_profiles,
    load_profile,
    profile_from_dict,
    resource_level,
    shipped_profile_names,
)
from fedhft.errors import FedHFTError

REQUIRED_SHIPPED = (
    "rpi4-4gb",
    "rpi5-8gb",
    "jetson-orin-nano-8gb",
    "phone-midrange-6gb",
    "phone-lowend-3gb",
    "laptop-x86-16gb",
)


def valid_dict(**overrides: Any) -> dict[str, Any]:
    """A valid profile table; overrides replace fields, a value of None removes the field."""
    data: dict[str, Any] = {
        "name": "my-board",
        "description": "A test board",
        "arch": "aarch64",
        "ram_mb": 2048,
        "train_memory_fraction": 0.5,
        "fp32_gflops": 12.5,
        "uplink_mbps": 20,
        "downlink_mbps": 50.0,
        "runtimes": ["executorch"],
        "default_runtime": "executorch",
        "target_step_seconds": 5.0,
        "target_upload_seconds": 10.0,
        "batch_size": 4,
        "sources": ["https://example.org/spec : made up for a test"],
    }
    for key, value in overrides.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def to_toml(data: dict[str, Any]) -> str:
    """A tiny TOML writer for the flat tables used here (str, int, float, list of str)."""

    def value(v: Any) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in data.items())


def test_required_profiles_are_shipped() -> None:
    names = shipped_profile_names()
    assert names == sorted(names)
    for name in REQUIRED_SHIPPED:
        assert name in names


@pytest.mark.parametrize("name", REQUIRED_SHIPPED)
def test_shipped_profile_loads_and_is_sane(name: str) -> None:
    profile = load_profile(name)
    assert isinstance(profile, DeviceProfile)
    assert profile.name == name
    assert profile.arch in ARCHES
    assert set(profile.runtimes) <= set(RUNTIMES)
    assert profile.default_runtime in profile.runtimes
    assert 0 < profile.train_memory_fraction <= 1
    assert profile.batch_size == 8
    assert len(profile.sources) >= 2
    assert all("http" in s or "Data Sheet" in s for s in profile.sources)
    assert resource_level(profile) in RESOURCE_LEVELS
    # a round trip through to_dict validates again and gives the same profile
    assert profile_from_dict(profile.to_dict(), f"{name}.toml") == profile


@pytest.mark.parametrize("name", REQUIRED_SHIPPED)
def test_shipped_runtimes_follow_the_platform(name: str) -> None:
    profile = load_profile(name)
    if name.startswith(("rpi", "jetson")):
        assert profile.runtimes == ("executorch",)  # no onnxruntime-training wheel for aarch64 Linux
    elif name.startswith("phone"):
        assert profile.runtimes == ("ort", "executorch") and profile.default_runtime == "executorch"
    else:
        assert profile.arch == "x86_64" and profile.default_runtime == "ort"


def test_list_profiles_sorted_and_complete() -> None:
    profiles = list_profiles()
    assert [p.name for p in profiles] == shipped_profile_names()


def test_all_three_resource_levels_occur() -> None:
    levels = {resource_level(p) for p in list_profiles()}
    assert levels == set(RESOURCE_LEVELS)


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("rpi4-4gb", "low"),
        ("phone-lowend-3gb", "low"),
        ("rpi5-8gb", "mid"),
        ("jetson-orin-nano-8gb", "mid"),
        ("phone-midrange-6gb", "mid"),
        ("laptop-x86-16gb", "high"),
    ],
)
def test_resource_level_of_shipped(name: str, level: str) -> None:
    assert resource_level(load_profile(name)) == level


@pytest.mark.parametrize(
    ("overrides", "level"),
    [
        ({"ram_mb": 2000, "train_memory_fraction": 0.5}, "low"),  # 1000 MB budget
        ({"ram_mb": 8192, "fp32_gflops": 14.9}, "low"),
        ({"ram_mb": 8192, "fp32_gflops": 100, "uplink_mbps": 9.9}, "low"),
        ({"ram_mb": 8192, "fp32_gflops": 100, "uplink_mbps": 40}, "high"),
        ({"ram_mb": 8192, "fp32_gflops": 49.9, "uplink_mbps": 40}, "mid"),
        ({"ram_mb": 7998, "fp32_gflops": 100, "uplink_mbps": 40}, "mid"),  # 3999 MB budget
    ],
)
def test_resource_level_thresholds(overrides: dict[str, Any], level: str) -> None:
    assert resource_level(profile_from_dict(valid_dict(**overrides), "t.toml")) == level


def test_user_toml_path(tmp_path: Path) -> None:
    path = tmp_path / "my-board.toml"
    path.write_text(to_toml(valid_dict()), encoding="utf-8")
    for arg in (path, str(path)):
        profile = load_profile(arg)
        assert profile.name == "my-board"
        assert profile.runtimes == ("executorch",)
        assert profile.sources == ("https://example.org/spec : made up for a test",)
        assert isinstance(profile.uplink_mbps, float)
        assert profile.memory_budget_mb == 1024


def test_user_file_without_toml_suffix(tmp_path: Path) -> None:
    path = tmp_path / "board.profile"
    path.write_text(to_toml(valid_dict(batch_size=None, sources=None)), encoding="utf-8")
    profile = load_profile(str(path))
    assert profile.batch_size == 8 and profile.sources == ()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"ram_mb": None}, "missing required field 'ram_mb'"),
        ({"name": None}, "missing required field 'name'"),
        ({"ram_mb": -5}, "field 'ram_mb' must be a positive number, got -5"),
        ({"ram_mb": "4096"}, "field 'ram_mb'"),
        ({"ram_mb": 1024.5}, "field 'ram_mb'"),
        ({"train_memory_fraction": 1.5}, "field 'train_memory_fraction' must be a number in (0, 1], got 1.5"),
        ({"train_memory_fraction": 0}, "field 'train_memory_fraction'"),
        ({"fp32_gflops": 0}, "field 'fp32_gflops'"),
        ({"uplink_mbps": True}, "field 'uplink_mbps'"),
        ({"downlink_mbps": float("nan")}, "field 'downlink_mbps'"),
        ({"target_step_seconds": -1.0}, "field 'target_step_seconds'"),
        ({"target_upload_seconds": "10"}, "field 'target_upload_seconds'"),
        ({"arch": "riscv64"}, "field 'arch'"),
        ({"runtimes": ["executorch", "tflite"]}, "field 'runtimes' has unknown runtime 'tflite'"),
        ({"runtimes": []}, "field 'runtimes'"),
        ({"runtimes": "executorch"}, "field 'runtimes'"),
        ({"runtimes": ["executorch", "executorch"]}, "field 'runtimes'"),
        ({"default_runtime": "ort"}, "field 'default_runtime'"),
        ({"batch_size": 0}, "field 'batch_size'"),
        ({"batch_size": 8.0}, "field 'batch_size'"),
        ({"sources": "https://example.org"}, "field 'sources'"),
        ({"sources": ["ok", 3]}, "field 'sources'"),
        ({"name": ""}, "field 'name'"),
        ({"description": "  "}, "field 'description'"),
        ({"gpu_tflops": 1.0}, "unknown field 'gpu_tflops'"),
    ],
)
def test_bad_field_is_named(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ProfileError) as info:
        profile_from_dict(valid_dict(**overrides), "bad-board.toml")
    message = str(info.value)
    assert message.startswith("profile bad-board.toml: ")
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"ram_mb": None}, "'ram_mb'"),
        ({"ram_mb": -5}, "'ram_mb'"),
        ({"train_memory_fraction": 1.5}, "'train_memory_fraction'"),
        ({"runtimes": ["tflite"], "default_runtime": "tflite"}, "'runtimes'"),
        ({"runtimes": ["ort"]}, "'default_runtime'"),
        ({"color": "red"}, "'color'"),
    ],
)
def test_bad_user_file_names_file_and_field(tmp_path: Path, overrides: dict[str, Any], needle: str) -> None:
    path = tmp_path / "bad-board.toml"
    path.write_text(to_toml(valid_dict(**overrides)), encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message


@pytest.mark.parametrize(
    "text",
    ['name = "x"\nram_mb = \n', 'name = "unterminated\n', "[section\n", 'name = "a"\nname = "b"\n'],
)
def test_bad_toml_syntax_names_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message and "invalid TOML" in message and "\n" not in message


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.toml")


@pytest.mark.parametrize("name", ["rpi3-1gb", "RPI4-4GB", "../profiles/rpi4-4gb", ""])
def test_unknown_profile_name_lists_shipped(name: str) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(name)
    message = str(info.value)
    assert f"unknown profile {name!r}" in message
    for shipped in REQUIRED_SHIPPED:
        assert shipped in message
    assert "\n" not in message


def test_profile_error_is_a_fedhft_error() -> None:
    assert issubclass(ProfileError, FedHFTError)


def test_profile_is_frozen() -> None:
    profile = load_profile("rpi4-4gb")
    with pytest.raises(AttributeError):
        profile.ram_mb = 1  # type: ignore[misc]


def test_package_import_is_torch_free() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import fedhft.device_profiles as d; d.list_profiles(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
