"""Config JSON checks of the converter: translate a release / diffusers / Hugging Face config as the
component's converter will, and type-check the result, so that a wrongly typed field gets a one-line
error naming it instead of a TypeError deep inside (or a silently wrong config).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from m141jax.convert.dit import dit_config_from_dict
from m141jax.convert.hf import clip_text_config_from_hf, llama_config_from_hf, llava_config_from_hf
from m141jax.convert.sources import find_files, read_config_json
from m141jax.convert.vae import vae_config_from_dict

# component name -> the function that turns its config JSON into the config dataclass
TRANSLATORS = {"dit": dit_config_from_dict, "vae": vae_config_from_dict, "llm": llama_config_from_hf,
               "clip": clip_text_config_from_hf, "vlm": llava_config_from_hf}


def _type_errors(value, hint) -> str | None:
    """The expected type's name when `value` does not match the annotation `hint`, else None (also for
    annotations this check does not understand)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_type_errors(value, a) for a in args]
        return None if any(r is None for r in results) else " or ".join(r for r in results if r)
    if origin is tuple:
        if not isinstance(value, tuple):
            return f"a list of {args[0].__name__ if args and isinstance(args[0], type) else 'values'}"
        elems = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(elems) != len(value):
            return f"a list of {len(elems)} values"
        bad = [_type_errors(v, a) for v, a in zip(value, elems)]
        return next((f"a list of {b}s" for b in bad if b), None)
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else "true/false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def config_type_problems(cfg, prefix: str = "") -> list[tuple[str, object, str]]:
    """(field, value, expected) for every field of a config dataclass (nested ones included) whose value
    does not have the annotated type."""
    out = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += config_type_problems(value, f"{prefix}{f.name}.")
            continue
        want = _type_errors(value, hints.get(f.name))
        if want:
            out.append((prefix + f.name, value, want))
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def check_config(component: str, d: dict, where: str):
    """Translate a config JSON (dict) as the component's converter will, and type-check the result:
    one-line ValueErrors naming the field instead of the TypeError / AttributeError a wrongly typed
    value raises deep inside, or the wrongly typed config it silently builds. Returns the config."""
    translate = TRANSLATORS[component]
    try:
        cfg = translate(d)
    except ValueError as e:
        raise ValueError(f"{where}: {_one_line(e)}") from None
    except Exception as e:  # TypeError, AttributeError, KeyError, transformers' validation errors, ...
        # the field to blame: the one whose removal lets the translation succeed (else changes its error)
        def outcome(k):
            try:
                translate({j: v for j, v in d.items() if j != k})
                return None
            except Exception as other:
                return type(other), str(other)

        results = {k: outcome(k) for k in d}
        blame = [k for k, r in results.items() if r is None] or \
                [k for k, r in results.items() if r != (type(e), str(e))]
        if len(blame) == 1:
            k = blame[0]
            raise ValueError(f"{where}: field {k!r} has a wrong type or value ({json.dumps(d[k])[:80]}): "
                             f"{type(e).__name__}: {_one_line(e)}") from None
        raise ValueError(f"{where}: a field has a wrong type ({type(e).__name__}: {_one_line(e)})") from None
    problems = config_type_problems(cfg)
    if problems:
        field, value, want = problems[0]
        same = [k for k, v in d.items() if v is value]  # the JSON key, when the value was passed through
        names = [k for k in same if k == field] or (same if len(same) == 1 else [field])
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, list)) else repr(value)
        raise ValueError(f"{where}: field {names[0]!r} must be {want}, found {type(value).__name__} {shown}{more}")
    return cfg


def check_config_source(component: str, config: str | None, src: str | Path) -> None:
    """check_config on the JSON the converter will use: --config when it names a file, else the source
    folder's config.json. Presets need no check."""
    if config is not None:
        if Path(config).is_file():
            check_config(component, read_config_json(config, "--config"), f"--config {config}")
        return
    folder = find_files(src)[1]
    if folder is not None:
        check_config(component, read_config_json(folder), str(folder))
