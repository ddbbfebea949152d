"""The JSON sdcli reads back (a saved doctor report, a cached plan), checked before it is used: a bad value is one
line naming the field. (The options' own text is cli.py's to parse, their values options.py's to check.)
"""

from __future__ import annotations

import re

from sdcli.errors import SdcliError

# ----- JSON read back -------------------------------------------------------------------------------------
#
# A spec is a type or a tuple of types; a dict of field specs, where the key `...` gives the spec of every
# other field (None: no other fields allowed); [spec] for a list of those; Need(spec) for a field that must
# be there (others may be missing, as the readers use .get); or a function(value, where) that raises Invalid.


class Invalid(ValueError):
    """Where a JSON document differs from its spec, e.g. `gpus[0].index: expected a whole number, found text`."""


class Need:
    def __init__(self, spec):
        self.spec = spec


NONE = type(None)
TYPE_NAMES = {str: "text", int: "a whole number", float: "a number", bool: "true or false", dict: "an object",
              list: "a list", NONE: "null"}


def maybe(*types) -> tuple:
    return (*types, NONE)


def conform(value, spec, where: str = "") -> None:
    """Raise Invalid naming the first field of `value` that does not fit `spec`."""
    if isinstance(spec, Need):
        spec = spec.spec
    if callable(spec) and not isinstance(spec, type):
        spec(value, where)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise Invalid(f"{where or 'the document'}: expected an object, found {kind(value)}")
        for key, sub in spec.items():
            if isinstance(sub, Need) and key not in value:
                raise Invalid(f"{join(where, key)}: missing")
        for key, item in value.items():
            if key in spec:
                conform(item, spec[key], join(where, key))
            elif ... in spec:
                if spec[...] is None:
                    raise Invalid(f"{join(where, key)}: not a field here")
                conform(item, spec[...], join(where, key))
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise Invalid(f"{where or 'the document'}: expected a list, found {kind(value)}")
        for i, item in enumerate(value):
            conform(item, spec[0], f"{where}[{i}]")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        allowed = (*types, int) if float in types else types  # JSON has one kind of number
        if isinstance(value, bool) and bool not in types or not isinstance(value, allowed):
            expected = " or ".join(dict.fromkeys(TYPE_NAMES.get(t, t.__name__) for t in types))
            raise Invalid(f"{where or 'the document'}: expected {expected}, found {kind(value)}")


def join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def kind(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return TYPE_NAMES.get(type(value), type(value).__name__)


def compute_capability(value, where: str) -> None:
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"\d+\.\d+", value)):
        raise Invalid(f"{where}: expected a compute capability like \"8.6\", found {kind(value)}")


# What `sdcli doctor` reads from a hardware report (see hardware.probe, which writes it).
REPORT = {
    "schema": Need(str),
    "system": {"os": maybe(str), "python": maybe(str), "cpu": maybe(str), "cpu_count": maybe(int),
               "ram_gb": maybe(float)},
    "nvml": {"available": maybe(bool), "error": maybe(str), "driver": maybe(str), "cuda_driver": maybe(str)},
    "gpus": [{"index": Need(int), "name": Need(str), "compute_capability": compute_capability,
              "memory_total_gb": maybe(float), "memory_free_gb": maybe(float), "multiprocessors": maybe(int)}],
    "torch": {"version": maybe(str), "cuda": maybe(str), "cudnn": maybe(int), "cuda_available": maybe(bool),
              "device_count": maybe(int), "error": maybe(str), "flash_attention_impls": [str]},
    "packages": {...: {"version": maybe(str), "import_ok": maybe(bool), "error": maybe(str), "ops_ok": maybe(bool),
                       "built_for_torch": maybe(str), "built_for_cuda": maybe(str), "load_error": maybe(str)}},
    "dtypes": {"device": maybe(str), "error": maybe(str),
               ...: {"supported": maybe(bool), "how": maybe(str), "detail": maybe(str)}},
}


def report(data: dict, path) -> dict:
    """A saved report, every field the verdicts and tables read of the right type, or an SdcliError naming it."""
    try:
        conform(data, REPORT)
    except Invalid as exc:
        raise SdcliError(f"{path} is not a valid sdcli report: {exc}") from None
    return data


def measurement(value, where: str) -> None:
    conform(value, {"backend": Need(str), "ok": Need(bool), "ms": float}, where)
    if value["ok"] and "ms" not in value:
        raise Invalid(f"{where}.ms: missing (a measurement within its bound has a time)")


# What `--backend auto` and `sdcli doctor` read from a cached plan (see tuning.load_or_tune, which writes it).
SHAPE = {"heads": Need(int), "head_dim": Need(int), "q_len": maybe(int), "kv_len": maybe(int), "dtype": str,
         "mask": bool, "batch": maybe(int), ...: None}  # backends.Shape(**shape): no other fields
PLAN = {
    "key": Need({"machine": Need(str), "model": Need(str), "width": Need(int), "height": Need(int),
                 "batch_size": Need(int), "dtype": Need(str)}),
    "shapes": Need([{"shape": Need(SHAPE), "choice": maybe(str), "measurements": Need([measurement])}]),
}
