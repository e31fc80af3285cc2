"""Strict `--NAME=value` overrides for a block of UPPER_CASE constants, and a frozen config.

The rules (each one tested in tests/test_config.py):
- every argument is `--NAME=value`, NAME spelled exactly like the constant; an unknown NAME is an
  error that suggests the closest names;
- the value is split on the first `=` only, so `--OUTPUT_DIR=a=b` gives "a=b" (and
  `--VALIDATION_PROMPTS=a=b` the one prompt "a=b");
- the type must match the default: str defaults take the text as it is; bools take True/False only;
  ints take integers; floats take integers or floats (numbers also take None, which the script's
  checks accept only where a setting documents it); lists take a Python list or comma-separated
  text, except lists of prompts (names ending in PROMPTS), where plain text is one prompt, commas and
  all: `--VALIDATION_PROMPTS="a dog, in a bucket"` is one prompt, `"['a, b', 'c']"` two; a None default
  takes any Python literal, or the text itself when it is not one;
- every override is printed.
"""
import ast
import copy
import difflib
import json


class UserError(Exception):
    """A mistake the user can fix: printed as one line, no traceback."""


def _type_error(name, default, text, wanted):
    return UserError(f"--{name}={text}: expected {wanted} (the default is {default!r}) — e.g. --{name}={default!r}")


def parse_value(name, text, default):
    """Turn the text of `--NAME=text` into a value of the default's type."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if text not in ("True", "False"):
            raise UserError(f"--{name}={text}: expected True or False")
        return text == "True"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # not a Python literal: plain text
    if default is None:
        return value
    if value is None and isinstance(default, (int, float)):  # numbers may be switched off; check_config says where
        return None
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, default, text, "a number")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, default, text, "an integer")
        return value
    if isinstance(default, (list, tuple)):
        if isinstance(value, str) and name.endswith("PROMPTS"):  # a prompt's commas are part of it
            value = [value]
        elif isinstance(value, str):  # --TARGET_MODULES=to_q,to_v
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _type_error(name, default, text, "a list")
        return list(value)
    raise _type_error(name, default, text, type(default).__name__)


def parse_overrides(argv, defaults, log=print):
    """Apply `--NAME=value` arguments to a copy of `defaults` (a dict) and return it."""
    config = copy.deepcopy(dict(defaults))  # lists are copied: the module's defaults never change
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"cannot read argument {arg!r}: every setting is given as --NAME=value, e.g. --LORA_RANK=8")
        name, text = arg[2:].split("=", 1)
        if name not in defaults:
            close = difflib.get_close_matches(name.upper(), list(defaults), n=3, cutoff=0.5)
            hint = f" — did you mean {' or '.join('--' + c for c in close)}?" if close else " — see the constants at the top of the script"
            raise UserError(f"unknown setting --{name}{hint}")
        config[name] = parse_value(name, text, defaults[name])
        log(f"override: {name} = {config[name]!r}")
    return config


class Config:
    """A read-only view of the resolved settings: cfg.LORA_RANK, cfg.as_dict()."""

    def __init__(self, values):
        object.__setattr__(self, "_values", copy.deepcopy(dict(values)))

    def __getattr__(self, name):
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(name) from None
        return tuple(value) if isinstance(value, list) else value  # a list handed out could be changed

    def __setattr__(self, name, value):
        raise AttributeError(f"the config is frozen after parsing; cannot set {name}")

    def replace(self, **values):
        """A new frozen Config with these values changed (for what is known only once the model is: the
        resolution a RESOLUTION of None stands for)."""
        return Config({**self._values, **values})

    def as_dict(self):
        return json.loads(json.dumps(self._values))  # a deep, JSON-safe copy

    def to_json(self):
        return json.dumps(self._values, indent=2, sort_keys=True)
