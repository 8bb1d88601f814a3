"""Range and choice checks of the command options, shared by the option records (ExtractOptions,
TrainOptions, PlanOptions) so that library users and the CLI get the same one-line error.

Messages name the option as the CLI spells it (`--batch-size 0: ...`); the CLI only prints them.
"""

from __future__ import annotations

import re

from .errors import UserError

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_int(option: str, value, least: int, meaning: str = "") -> None:
    """`value` (None: not given) must be an integer >= `least`."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        bound = "0 or more" if least == 0 else f"at least {least}"
        raise UserError(f"{option} {value}: must be {bound}" + (f" ({meaning})" if meaning else ""))


def check_positive(option: str, value, meaning: str = "") -> None:
    """`value` (None: not given) must be a number > 0."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise UserError(f"{option} {value}: must be more than 0" + (f" ({meaning})" if meaning else ""))


def check_device(device: str) -> None:
    """The devices the commands run on: the CPU or a CUDA GPU."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise UserError(f"--device {device!r}: not a device here; use cpu, cuda or cuda:N "
                        "(under torchrun each rank uses its LOCAL_RANK GPU)")


__all__ = ["check_device", "check_int", "check_positive"]
