"""Settings shared by the scripts: dataclass configs whose fields are the command-line flags, each field
declared with its allowed values (`setting`), one check of them all (`check_settings`), and the device.

train.py (TrainConfig), sample.py (SampleConfig), shapes.py and t2i_r1.SamplingConfig declare their
settings this way; a flag's help is its field's trailing comment.
"""

import argparse
import inspect
import math
import re
from dataclasses import MISSING, field, fields, is_dataclass

import torch


def setting(default=None, *, low=None, above=None, high=None, choices=None, why="", flag=None):
    """A config field with its allowed values beside it: at least `low`, more than `above`, at most `high`,
    or one of `choices` (None, unset, is always allowed). why: said after the bound in the error. flag: the
    name errors use for it when the command line knows it by another (cfg_weight is --cfg)."""
    meta = dict(low=low, above=above, high=high, choices=choices, why=why, flag=flag)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _bound(m) -> str:
    if m["low"] is not None and m["low"] == m["high"]:
        return f"be {m['low']}"
    if m["low"] is not None and m["high"] is not None:
        return f"lie in [{m['low']}, {m['high']}]"
    if m["above"] is not None and m["high"] is not None:
        return f"lie in ({m['above']}, {m['high']}]"
    if m["above"] is not None:
        return "be positive" if m["above"] == 0 else f"be more than {m['above']}"
    return f"be at least {m['low']}"


def check_settings(cfg):
    """ValueError naming the flag of the first setting of cfg (nested configs included) outside what its field
    declares."""
    for f in fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        if is_dataclass(value):
            check_settings(value)
            continue
        if value is None or not m:
            continue
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        if m["choices"] is not None and value not in m["choices"]:
            raise ValueError(f"{flag} must be one of {', '.join(m['choices'])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        if ((m["low"] is not None and not value >= m["low"]) or (m["above"] is not None and not value > m["above"])
                or (m["high"] is not None and not value <= m["high"])):
            raise ValueError(f"{flag} must {_bound(m)}{m['why']}, got {value}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the description as written, and every flag's default after its help line."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.default is argparse.SUPPRESS or not action.option_strings:
            return action.help
        return f"{action.help} (default: {'unset' if action.default is None else '%(default)s'})"


def config_flags(parser, cls, given_only=False):
    """A command-line flag per field of a dataclass config: --field-name (and the field's own `flag`, if it
    declares one), typed as the field, its choices the field's, its help the field's trailing comment and its
    default. given_only: parse_args returns only the flags given (a resumed run lays them over its saved
    config)."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in fields(cls):
        if is_dataclass(f.type):  # a nested config (TrainConfig.sampling) brings its own flags
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        flags = ["--" + f.name.replace("_", "-")] + ([f.metadata["flag"]] if f.metadata.get("flag") else [])
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(nargs="*") if f.type is list
                else dict(type=f.type, choices=f.metadata.get("choices")))
        parser.add_argument(*flags, default=argparse.SUPPRESS if given_only else default, **kind,
                            help=f"{comments.get(f.name, '')} (default: {'unset' if default is None else default})")


def default_device(device=None) -> torch.device:
    """The device asked for, else CUDA when present, else the CPU. ValueError for a name torch does not know
    (`cdua`) or a GPU this torch cannot see, instead of a traceback at the first tensor put there."""
    if device is None or isinstance(device, torch.device):
        return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return d
