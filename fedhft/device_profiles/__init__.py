"""Device profiles: shipped and user-supplied descriptions of what an edge device can give a training job.

Torch-free: importing this package pulls in only the standard library and fedhft.errors.
"""

from .profile import (
    ARCHES,
    RESOURCE_LEVELS,
    RUNTIMES,
    DeviceProfile,
    ProfileError,
    ResourceLevel,
    list_profiles,
    load_profile,
    profile_from_dict,
    resource_level,
    shipped_profile_names,
)

__all__ = [
    "ARCHES",
    "RESOURCE_LEVELS",
    "RUNTIMES",
    "DeviceProfile",
    "ProfileError",
    "ResourceLevel",
    "list_profiles",
    "load_profile",
    "profile_from_dict",
    "resource_level",
    "shipped_profile_names",
]
