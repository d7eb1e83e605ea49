"""Device profiles: what a target can do, and what a model would cost there (estimated).

A profile (YAML, see ``deploy/profiles/`` for the shipped ones) gives a device's memory,
peak operations per second by precision, memory bandwidth and power envelope, from its
public datasheet. :func:`estimate_on` turns a variant's measured operation counts and bytes
(the ``energy`` record of a run: MACs, the int8 share, weight bytes read) into a latency
and an energy per inference on that device with a roofline: the time is the longer of the
arithmetic at a fraction of peak and the bytes at the bandwidth, and the energy is that
time at the power envelope. These are estimates, labelled so beside the measured figures
of the machine a run was measured on; they rank variants for a device this machine is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimkit.config import format_validation_error
from slimkit.errors import ConfigError

PROFILES = Path(__file__).with_name("profiles")
# The share of peak arithmetic that dense inference kernels reach: vendor libraries reach
# 50-70% on large GEMMs and convolutions and less on small ones.
EFFICIENCY = 0.5


class DeviceProfile(BaseModel):
    """A deployment target, from its datasheet.

    Attributes:
        name, description: how the profile is named and what device it is.
        memory_bytes: memory the model and its activations share.
        peak_ops: peak operations per second by precision (``fp32``, ``fp16``, ``int8``;
            a multiply-accumulate is two operations). A precision the device lacks runs at
            the fp32 rate.
        bandwidth_bytes_per_s: memory bandwidth.
        power_watts: the power envelope the device runs in under load.
        fast_precisions: the precisions it computes faster than fp32.
        source: the datasheet the figures come from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    memory_bytes: float = Field(gt=0)
    peak_ops: dict[str, float]
    bandwidth_bytes_per_s: float = Field(gt=0)
    power_watts: float = Field(gt=0)
    fast_precisions: list[str] = Field(default_factory=list)
    source: str


def profile_names() -> list[str]:
    """The shipped profiles' names."""
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a profile YAML file of your own device."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"device profile {str(name_or_path)!r}: no such profile; shipped ones are "
                          f"{', '.join(profile_names())}, or give the path of a YAML file")
    try:
        return DeviceProfile.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None


def estimate_on(profile: DeviceProfile, macs: int, bytes_moved: int, int8_fraction: float = 0.0,
                fp16_fraction: float = 0.0, efficiency: float = EFFICIENCY) -> dict[str, Any]:
    """Latency and energy of one inference on ``profile``'s device, by roofline.

    Args:
        macs: multiply-accumulates of the inference.
        bytes_moved: bytes read from memory (weights, once per inference).
        int8_fraction, fp16_fraction: shares of the MACs computed in int8 and fp16.
        efficiency: the share of peak arithmetic reached.

    Returns:
        ``{"latency_ms", "energy_mj", "bound", "device", "estimate": True, ...}``.
    """
    fp32 = profile.peak_ops.get("fp32")
    if fp32 is None:
        raise ConfigError(f"device profile {profile.name!r}: peak_ops needs an fp32 figure")
    shares = {"int8": int8_fraction, "fp16": fp16_fraction, "fp32": 1.0 - int8_fraction - fp16_fraction}
    compute = sum(2 * macs * share / (profile.peak_ops.get(p, fp32) * efficiency) for p, share in shares.items())
    memory = bytes_moved / profile.bandwidth_bytes_per_s
    seconds = max(compute, memory)
    return {"device": profile.name, "estimate": True, "latency_ms": seconds * 1e3,
            "energy_mj": seconds * profile.power_watts * 1e3,
            "bound": "compute" if compute >= memory else "memory",
            "compute_ms": compute * 1e3, "memory_ms": memory * 1e3,
            "fits_memory": bytes_moved <= profile.memory_bytes, "efficiency": efficiency,
            "source": profile.source}


def estimates_for(energy: dict[str, Any], profiles: list[DeviceProfile]) -> list[dict[str, Any]]:
    """Each profile's estimate for a variant, from its run record's ``energy`` entry
    (``macs``, ``int8_mac_fraction``, ``bytes_moved``)."""
    return [estimate_on(p, energy["macs"], energy["bytes_moved"], energy.get("int8_mac_fraction", 0.0))
            for p in profiles]
